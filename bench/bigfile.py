#!/usr/bin/env python3
"""Add many settled calls to a callgate state file, for measurements on a large file.

    bigfile.py STATE_FILE COUNT

STATE_FILE is a file a callgate made (so that it has the schema), with the gateway stopped. The
script adds COUNT settled calls of the tenant `bench` before the calls already there (their
reservation ids sort first: the gateway's new ones still append), each with a random upstream id,
settles the calls already there (so that no lease of theirs ends during a later measurement),
and adds an empty `call_ids` table, which makes the next start index every upstream id in
`call_keys` (as for a file of an older version). bench/bigfile.sh does the whole of it.
"""
import sqlite3
import sys
import time

OBJECT = ('{"id":"call_x","status":"completed","phone_number":"+14155551234",'
          '"from_number":"+18005551234","agent_id":"agent_abc123","max_duration":600,'
          '"record":true,"created_at":"2026-01-01T00:00:00Z"}')


def main(path, count):
    conn = sqlite3.connect(path, isolation_level=None)
    # A rollback journal (the gateway puts the file back in WAL mode when it opens it): the new
    # pages need no copy in a log the size of the file.
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    started = time.time()
    conn.execute("BEGIN")
    conn.execute(f"""
        WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {count})
        INSERT INTO calls (reservation_id, tenant, call_id, token_hash, status, object, live, hold,
            charged, price, increment_secs, max_duration, duration, lease_expires_at, created_at,
            updated_at, tenant_webhook)
        SELECT printf('00%06x-0000-7000-8000-%012x', i / 65536, i), 'bench',
            'call_' || lower(hex(randomblob(16))), lower(hex(randomblob(32))), 'completed', ?1,
            0, 0, 10, 1, 60, 600, 60, 1700000000000000 + i, 1700000000000000 + i,
            1700000000000000 + i, NULL
        FROM s""", (OBJECT,))
    conn.execute("UPDATE calls SET live = 0, hold = 0, charged = hold, status = 'completed', "
                 "duration = 60 WHERE live = 1")
    conn.execute("CREATE TABLE IF NOT EXISTS call_ids "
                 "(call_id TEXT PRIMARY KEY, reservation_id TEXT NOT NULL) WITHOUT ROWID")
    conn.execute("COMMIT")
    calls = conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    print(f"{calls} calls in {path} ({count} added in {time.time() - started:.1f} s)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]))
