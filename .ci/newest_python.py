"""Print the path of the newest Python >= 3.12 on this machine (nothing if none).

Looks at python3.N on PATH and at pyenv's and /usr's installations, and asks
each interpreter its version (pyenv shims of inactive versions do not run).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

MINIMUM = (3, 12)


def candidates() -> set[str]:
    found = set()
    for minor in range(MINIMUM[1], 30):
        path = shutil.which(f"python3.{minor}")
        if path:
            found.add(path)
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    for root in filter(None, roots):
        found.update(glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3")))
    found.update(glob.glob("/usr/bin/python3.*") + glob.glob("/usr/local/bin/python3.*"))
    return {p for p in found if os.access(p, os.X_OK) and not p.endswith("-config")}


def version(path: str) -> tuple[int, ...] | None:
    code = "import sys, venv, ensurepip; print(*sys.version_info[:3])"
    try:
        out = subprocess.run([path, "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # a shim of an inactive version, or no venv/ensurepip
        return None
    return tuple(int(v) for v in out.stdout.split())


def main() -> None:
    best = None
    for path in sorted(candidates()):
        v = version(path)
        if v is not None and v[:2] >= MINIMUM and (best is None or v > best[0]):
            best = (v, path)
    if best is not None:
        print(best[1])


if __name__ == "__main__":
    main()
