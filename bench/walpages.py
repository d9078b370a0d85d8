#!/usr/bin/env python3
"""bench/walpages.py DB: what the commits in DB's write-ahead log wrote, by b-tree.

Reads the frames of DB-wal that belong to the log's current run (the salts of its header),
counts its commits (frames that carry the database size), and maps each frame's page to the
table or index that owns it through SQLite's dbstat table, on a copy of the file and its log
(opening them recovers the log). Prints pages per commit in all and by b-tree. Meant for a log
left by `kill -9` (see bench/walpages.sh); a clean stop usually folds the log into the file.
"""
import collections
import os
import shutil
import sqlite3
import struct
import sys
import tempfile

db = sys.argv[1]
with tempfile.TemporaryDirectory() as tmp:
    copy = os.path.join(tmp, "copy.db")
    shutil.copy(db, copy)
    shutil.copy(db + "-wal", copy + "-wal")
    with open(copy + "-wal", "rb") as f:
        wal = f.read()
    if len(wal) < 32:
        sys.exit("the log is empty")
    page_size, _checkpoint, salt1, salt2 = struct.unpack(">4I", wal[8:24])
    pages, commits, committed, offset = [], 0, 0, 32
    while offset + 24 + page_size <= len(wal):
        page, db_size, s1, s2 = struct.unpack(">4I", wal[offset:offset + 16])
        if (s1, s2) != (salt1, salt2):
            break  # a frame of an earlier run of the log
        pages.append(page)
        if db_size != 0:  # a commit's last frame
            commits += 1
            committed = len(pages)
        offset += 24 + page_size
    del pages[committed:]  # a commit cut short by the kill
    con = sqlite3.connect(copy)
    owner = dict((pageno, name) for name, pageno in con.execute("SELECT name, pageno FROM dbstat"))
    con.close()
if commits == 0:
    sys.exit(f"{len(pages)} frames and no commit in the log's current run")
print(f"log: {len(pages)} frames, {commits} commits, {len(pages) / commits:.2f} pages per commit")
for name, n in collections.Counter(owner.get(p, "(free or past the end)") for p in pages).most_common():
    print(f"  {name:32s} {n / commits:6.2f}")
