"""Helpers of the fault tests (imported by them; fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path


def check_batches(loader, store: Path, variables) -> int:
    """Every batch of an epoch equals zarr-python reading ``store`` at its index;
    returns the number of batches."""
    import numpy as np
    import zarr

    group = zarr.open_group(str(store), mode="r")
    arrays = {v: group[v][...] for v in variables}
    h, w = loader.candidates.tile_hw
    n = 0
    for batch in loader:
        frames = np.concatenate([batch["input"].numpy(), batch["target"].numpy()], axis=1)
        steps = frames.shape[1]
        for i, (t0, y0, x0) in enumerate(batch["index"].numpy().tolist()):
            want = np.stack(
                [arrays[v][t0 : t0 + steps, y0 : y0 + h, x0 : x0 + w] for v in variables], 1
            )
            np.testing.assert_array_equal(frames[i], want, err_msg=f"sample {(t0, y0, x0)}")
        n += 1
    return n


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of ``size`` bytes mounted at ``path`` for the block (a small disk
    that fills up, or is remounted read-only: :func:`remount`). Yields ``path``,
    or None where this process may not mount (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    options = f"size={size},mode=0700"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "zarrdali-test", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    """Remount the tmpfs at ``path`` ``"ro"`` or ``"rw"``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)
