"""Copy the build and test sources of this checkout into an out-of-tree build folder.

    python scripts/sync_sources.py DEST      (run from the repository root)

Files are copied only when their content changed, so ninja (objects kept next to DEST)
rebuilds only what changed, even from a fresh clone whose checkout touched every mtime;
files no longer in the checkout are removed (built .so files and _build_info.json stay).
Used by scripts/cuda_gate.sh, scripts/test_compat.sh and scripts/gpu_check.py.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys

PATHS = ("csrc", "metaembed_kernels", "tests", "benchmarks", "setup.py", "pyproject.toml", "README.md")
KEEP = (".so", "_build_info.json")


def wanted_files(repo: str):
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *PATHS], cwd=repo,
                            capture_output=True, text=True)
    files = [p for p in listed.stdout.splitlines() if os.path.isfile(os.path.join(repo, p))]
    if listed.returncode != 0 or not files:  # not a git checkout (an unpacked copy): walk the folders
        files = []
        for top in PATHS:
            path = os.path.join(repo, top)
            if os.path.isfile(path):
                files.append(top)
            for base, _, names in os.walk(path):
                files += [os.path.relpath(os.path.join(base, n), repo) for n in names]
    return {p for p in files if not p.endswith(KEEP + (".pyc",)) and "__pycache__" not in p}


def sync(repo: str, dst: str) -> int:
    wanted = wanted_files(repo)
    changed = 0
    for rel in wanted:
        s, d = os.path.join(repo, rel), os.path.join(dst, rel)
        if not (os.path.exists(d) and filecmp.cmp(s, d, shallow=False)):
            os.makedirs(os.path.dirname(d) or ".", exist_ok=True)
            shutil.copy2(s, d)
            os.utime(d)  # newer than any cached object
            changed += 1
    for base, _, names in os.walk(dst):
        for n in names:
            rel = os.path.relpath(os.path.join(base, n), dst)
            if rel not in wanted and not n.endswith(KEEP) and "__pycache__" not in rel:
                os.remove(os.path.join(base, n))
    return changed


if __name__ == "__main__":
    n = sync(os.getcwd(), sys.argv[1])
    print(f"   {n} file(s) changed since the last sync")
