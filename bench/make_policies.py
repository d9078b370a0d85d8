#!/usr/bin/env python3
"""Build a policies/ tree for bench/load.sh.

    make_policies.py SRC_POLICIES OUT_DIR COUNT KEY

Copies schemas/, lists/, secrets/ and packs/ from SRC_POLICIES and writes COUNT tenants into
OUT_DIR/tenants/, each acme's full policy (numbers, agents, calls, destinations with the
do-not-call list, webhooks, redaction) without [limits] and [budget]: a tenant with no limits.

Tenant 0 is `bench` with key KEY; tenant i >= 1 is `bench-NNNNN` (i, five digits) with key
`KEY-NNNNN`. key_sha256 is the hex SHA-256 of the key.
"""
import hashlib
import re
import shutil
import sys
import tomllib
from pathlib import Path

DROPPED = ("limits", "budget")


def bench_template(acme_text):
    """acme.toml without comments, [limits] and [budget*]; id, name and key as placeholders."""
    out, skip, in_table = [], False, False
    for line in acme_text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        header = re.match(r"^\[\[?\s*([A-Za-z0-9_.\-]+)\s*\]\]?$", s)
        if header:
            in_table = True
            skip = header.group(1).split(".")[0] in DROPPED
            if not skip:
                out.append("")
        if skip:
            continue
        if not in_table and re.match(r"^(id|name|key_sha256)\s*=", s):
            continue
        out.append(line)
    head = ['id = "@ID@"', 'name = "@NAME@"', 'key_sha256 = ["@KEY_SHA256@"]']
    return "\n".join(head + out) + "\n"


def fill(template, tenant_id, name, key_sha256):
    return (
        template.replace("@ID@", tenant_id).replace("@NAME@", name).replace("@KEY_SHA256@", key_sha256)
    )


def main():
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    src, out, count, key = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if count < 1:
        raise SystemExit("COUNT must be at least 1")
    for sub in ("schemas", "lists", "secrets", "packs"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, out / sub, dirs_exist_ok=True)
    tenants = out / "tenants"
    tenants.mkdir(parents=True, exist_ok=True)

    acme_text = (src / "tenants" / "acme.toml").read_text()
    template = bench_template(acme_text)

    # The bench tenant is exactly acme's policy minus limits and budget (and its identity).
    acme = tomllib.loads(acme_text)
    bench = tomllib.loads(fill(template, "bench", "x", "0" * 64))
    for k in DROPPED + ("id", "name", "key_sha256"):
        acme.pop(k, None)
    for k in ("id", "name", "key_sha256"):
        bench.pop(k, None)
    if acme != bench:
        raise SystemExit(f"bench tenant differs from acme's policy:\n{acme}\n{bench}")

    for i in range(count):
        tenant_id, tenant_key = ("bench", key) if i == 0 else (f"bench-{i:05d}", f"{key}-{i:05d}")
        text = fill(
            template,
            tenant_id,
            f"Bench tenant {i} (acme's policy, no limits)",
            hashlib.sha256(tenant_key.encode()).hexdigest(),
        )
        (tenants / f"{tenant_id}.toml").write_text(text)


if __name__ == "__main__":
    main()
