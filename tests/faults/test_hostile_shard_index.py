"""A shard index entry whose offset + size wraps around in uint64 arithmetic.

``(2**64 - 16, 32)`` ends at byte 16 when the sum is taken in uint64, so a check
``offset + nbytes <= size`` passes it; as int64 the offset is -16 and the decoder
reads before the start of the file's buffer (SIGSEGV with memory maps). Wanted:
a ``ChunkError`` naming the store, array, shard and inner chunk, whichever way
the file is read. Run in a subprocess: the failure this guards against kills it.
"""

from __future__ import annotations

import pytest

CHILD = r"""
import sys
from pathlib import Path

import crc32c
import numpy as np

import zarrdali
from storefactory import VarSpec, chunk_files, write_store

path, memory_map = Path(sys.argv[1]), sys.argv[4]
offset, nbytes = int(sys.argv[2]), int(sys.argv[3])
spec = VarSpec("t2m", shape=(8, 32, 32), chunks=(1, 16, 16), shards=(4, 32, 32))
store = write_store(path, [spec])
shard = chunk_files(store, "t2m")[0]
raw = bytearray(shard.read_bytes())
n_inner = 4 * 2 * 2
table = np.frombuffer(bytes(raw[-(n_inner * 16 + 4) : -4]), "<u8").reshape(n_inner, 2).copy()
table[0] = (offset, nbytes)
body = table.tobytes()
raw[-(n_inner * 16 + 4) :] = body + crc32c.crc32c(body).to_bytes(4, "little")  # a valid crc
shard.write_bytes(bytes(raw))
loader = zarrdali.ZarrLoader(store, ["t2m"], tile=(16, 16), batch_size=4, device="cpu",
                             workers=0, memory_map=memory_map == "maps")
try:
    for batch in loader:
        pass
except zarrdali.ChunkError as err:
    print(f"ChunkError|{err.store}|{err.array}|{err.key}|{err}")
else:
    print("no error")
finally:
    loader.close()
"""


@pytest.mark.time_limit(180)
@pytest.mark.parametrize("memory_map", ["pread", "maps"])
@pytest.mark.parametrize("entry", [(2**64 - 16, 32), (2**64 - 4096, 4112)])
def test_a_wrapping_index_entry_is_a_chunk_error(tmp_path, python_child, entry, memory_map):
    store = tmp_path / "wrap.zarr"
    done = python_child(CHILD, str(store), str(entry[0]), str(entry[1]), memory_map)
    assert done.returncode == 0, f"killed or failed ({done.returncode}): {done.stderr[-2000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("ChunkError|")]
    assert lines, f"no ChunkError: {done.stdout[-1000:]} {done.stderr[-1000:]}"
    _, name, array, key, message = lines[0].split("|", 4)
    assert name == str(store) and array == "t2m" and key == "c/0/0/0"
    assert "shard index points past the end" in message
    assert str(entry) in message and "inner chunk (0, 0, 0)" in message
