"""How the GPU kernels are compiled: NVRTC with IEEE float arithmetic, no
flush of denormals to zero (checked without a GPU).

CuPy's ``RawKernel``/``RawModule(code=...)`` append ``-ftz=true`` to every
compile (``cupy/cuda/compiler.py``): float subtract, divide, convert and
compare then flush denormals to zero (``sub.ftz.f32``, ``cvt.rn.ftz.f32.f64``,
``setp.eq.ftz.f32`` in the PTX), so a float64 -> float32 denormal became 0 and
a denormal compared equal to a missing value of 0.0, unlike the CPU path.
The backend compiles with NVRTC and :data:`~zarrdali.gpu.gather.NVRTC_OPTIONS`
and loads the binary with ``RawModule(path=...)``. Checked here: which
compile the backend asks for (on the CPU stand-in of CuPy, which compiles as
CuPy 14 does), and the PTX those exact options give, from the real NVRTC
(``libnvrtc``, where installed) or nvcc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import fakegpu
from zarrdali.gpu import gather as gpu_gather
from zarrdali.gpu.kernels import (
    CRC_GATE_SOURCE,
    PACK_SOURCE,
    finish_source,
    gather_source,
)

FTZ = re.compile(r"\.ftz\b")
OUT_DTYPES = ["f4", "f8", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8"]


def kernel_sources() -> dict[str, str]:
    """Every kernel source the backend compiles, by kernel name (dtype-suffixed)."""
    sources = {
        "zarrdali_pack": PACK_SOURCE,
        "zarrdali_crc_gate": CRC_GATE_SOURCE,
        "zarrdali_gather_finish": finish_source(),
    }
    for out in OUT_DTYPES:
        sources[f"zarrdali_gather:{out}"] = gather_source(np.dtype(out))
    return sources


# -- NVRTC through ctypes ---------------------------------------------------------------
def _find_nvrtc() -> ctypes.CDLL | None:
    candidates: list[str] = []
    for package in ("nvidia.cu13", "nvidia.cuda_nvrtc"):
        try:
            module = __import__(package, fromlist=["_"])
        except ImportError:
            continue
        for root in getattr(module, "__path__", []):
            candidates += sorted(str(p) for p in Path(root, "lib").glob("libnvrtc.so*"))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    candidates += sorted(str(p) for p in Path("/usr/local/cuda/lib64").glob("libnvrtc.so*"))
    for path in candidates:
        if "builtins" in path or ".alt." in path:
            continue
        try:  # NVRTC opens its builtins library by name: load the one beside it first
            for builtins in sorted(Path(path).parent.glob("libnvrtc-builtins.so*")):
                if ".alt." not in builtins.name:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC = _find_nvrtc()


def nvrtc_ptx(source: str, options: tuple[str, ...]) -> tuple[str, str]:
    """``(ptx, log)`` of ``source`` compiled by the real NVRTC with ``options``."""
    lib = NVRTC
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"k.cu", 0, None, None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert status == 0, log.value.decode()
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetPTX(prog, ptx) == 0
        return ptx.value.decode(), log.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compiled_ptx(source: str, options: tuple[str, ...], tmp_path: Path) -> str:
    """PTX of ``source`` with these compile options (NVRTC's option spellings,
    which nvcc shares for these): the real NVRTC, else nvcc."""
    if NVRTC is not None:
        return nvrtc_ptx(source, (*options, "-arch=compute_90"))[0]
    if shutil.which("nvcc") is None:
        pytest.skip("neither NVRTC nor nvcc is installed")
    src, ptx = tmp_path / "k.cu", tmp_path / "k.ptx"
    src.write_text(source)
    subprocess.run(["nvcc", "-ptx", "-arch=sm_90", *options, "-o", str(ptx), str(src)], check=True)
    return ptx.read_text()


# -- what the backend asks for ------------------------------------------------------------
def test_the_kernels_are_compiled_without_flush_to_zero(monkeypatch, tmp_path):
    """Every kernel the backend compiles goes through NVRTC with options whose
    PTX has no flush-to-zero instruction (CuPy's RawKernel would add -ftz=true)."""
    cuda = fakegpu.install(monkeypatch)
    monkeypatch.setattr(gpu_gather, "_binaries", {})
    kernels = gpu_gather.Kernels(cuda.cupy)
    for key, source in kernel_sources().items():
        kernels.get(key.split(":")[0], source)
    assert len(cuda.compiled) == len(kernel_sources())
    checked = set()
    for how, source, options in cuda.compiled:
        assert how == "nvrtc", how
        assert not any(o.startswith(("-ftz=true", "--ftz=true")) for o in options), options
        assert tuple(options) == gpu_gather.NVRTC_OPTIONS
        if source in (PACK_SOURCE, finish_source()):  # the finish kernel has every float op
            ptx = compiled_ptx(source, tuple(options), tmp_path)
            assert not FTZ.search(ptx), FTZ.findall(ptx)
            checked.add(source)
    assert finish_source() in checked


def test_compiled_kernels_are_loaded_once_per_process_and_device(monkeypatch):
    cuda = fakegpu.install(monkeypatch)
    monkeypatch.setattr(gpu_gather, "_binaries", {})
    source = gather_source(np.dtype("f4"))
    first = gpu_gather.Kernels(cuda.cupy).get("zarrdali_gather", source)
    again = gpu_gather.Kernels(cuda.cupy).get("zarrdali_gather", source)  # another backend
    assert first.name == again.name == "zarrdali_gather"
    assert [c[0] for c in cuda.compiled] == ["nvrtc"]  # compiled once, loaded from its file
    path = gpu_gather._binaries[(source, 0)]
    assert path.read_bytes().startswith(b"FAKECUBIN")


def test_a_cupy_without_nvrtc_falls_back_with_a_warning(monkeypatch):
    cuda = fakegpu.install(monkeypatch)
    monkeypatch.setattr(gpu_gather, "_ftz_warned", False)
    del cuda.cupy.cuda.compiler
    with pytest.warns(RuntimeWarning, match="flushes float denormals to zero"):
        gpu_gather.Kernels(cuda.cupy).get("zarrdali_pack", PACK_SOURCE)
    assert [c[0] for c in cuda.compiled] == ["RawKernel"]


# -- the real compiler -----------------------------------------------------------------
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason="libnvrtc is not installed")


@needs_nvrtc
@pytest.mark.parametrize("arch", ["compute_90", "compute_100"])
def test_every_kernel_compiles_with_nvrtc_without_a_warning(arch):
    for key, source in kernel_sources().items():
        ptx, log = nvrtc_ptx(source, (*gpu_gather.NVRTC_OPTIONS, f"-arch={arch}"))
        assert "warning" not in log.lower(), (key, log)
        assert ".entry " + key.split(":")[0] in ptx, key
        assert not FTZ.search(ptx), (key, FTZ.findall(ptx))


@needs_nvrtc
def test_cupys_flush_to_zero_is_what_the_options_avoid():
    """The difference is real: the finishing kernel compiled as CuPy's
    RawKernel compiles it flushes denormals in its subtract, divide, float64 ->
    float32 conversion and comparisons."""
    source = finish_source()
    ours, _ = nvrtc_ptx(source, (*gpu_gather.NVRTC_OPTIONS, "-arch=compute_90"))
    cupys, _ = nvrtc_ptx(source, ("-arch=compute_90", "-ftz=true"))
    flushed = set(re.findall(r"\b(\w+(?:\.\w+)*\.ftz(?:\.\w+)*)", cupys))
    assert {"sub.ftz.f32", "div.rn.ftz.f32", "cvt.rn.ftz.f32.f64"} <= flushed, flushed
    assert any(op.startswith("setp.eq.ftz") for op in flushed), flushed
    assert not FTZ.search(ours)
    assert "fma.rn" not in ours  # --fmad=false: no contraction numpy would not do


# -- the pack kernel's own source, run on the host ------------------------------------------
_HOST_PACK_MAIN = r"""
#include <string>
// argv: directory, n_jobs, src bytes, dst bytes, grid_y, threads
int main(int argc, char** argv) {
    if (argc != 7) return 1;
    std::string dir = argv[1];
    int n_jobs = std::atoi(argv[2]);
    long n_src = std::atol(argv[3]), n_dst = std::atol(argv[4]);
    unsigned int gy = std::atoi(argv[5]), threads = std::atoi(argv[6]);
    // 16-byte aligned buffers, as cudaMalloc's are (and a 512-byte pool's blocks)
    unsigned char* src = (unsigned char*)std::aligned_alloc(512, (n_src + 511) / 512 * 512);
    unsigned char* dst = (unsigned char*)std::aligned_alloc(512, (n_dst + 511) / 512 * 512);
    auto jobs = load<long long>((dir + "/jobs").c_str());
    auto in = load<unsigned char>((dir + "/src").c_str());
    auto out = load<unsigned char>((dir + "/dst").c_str());
    std::memcpy(src, in.data(), n_src);
    std::memcpy(dst, out.data(), n_dst);
    gridDim = {(unsigned int)n_jobs, gy, 1};
    blockDim = {threads, 1, 1};
    for (unsigned int bx = 0; bx < gridDim.x; ++bx)
        for (unsigned int by = 0; by < gridDim.y; ++by)
            for (unsigned int tx = 0; tx < blockDim.x; ++tx) {
                blockIdx = {bx, by, 0};
                threadIdx = {tx, 0, 0};
                zarrdali_pack(src, dst, jobs.data(), n_jobs);
            }
    FILE* f = std::fopen((dir + "/out").c_str(), "wb");
    std::fwrite(dst, 1, n_dst, f);
    std::fclose(f);
    return 0;
}
"""


@pytest.mark.parametrize("launch", [(1, 1), (2, 16), (3, 256)])
def test_the_pack_kernel_copies_any_offsets_16_bytes_at_a_time(tmp_path, launch):
    """``zarrdali_pack`` as host C++: jobs at every source and destination
    alignment, of 0 to 300 bytes, in any launch shape, copy exactly their bytes
    and nothing else (the destination's other bytes keep their poison)."""
    from test_gpu_backend import _HOST_LOAD, _HOST_SHIM

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++")
    source = tmp_path / "pack.cpp"
    source.write_text(_HOST_SHIM + _HOST_LOAD + PACK_SOURCE + _HOST_PACK_MAIN)
    binary = tmp_path / "pack"
    subprocess.run([compiler, "-O1", "-std=c++17", "-o", str(binary), str(source)], check=True)
    rng = np.random.default_rng(sum(launch))
    src = rng.integers(0, 256, 20000, dtype=np.uint8)
    jobs, d = [], 0
    for size in [0, 1, 15, 16, 17, 31, 32, 33, 48, 300, *rng.integers(0, 300, 40).tolist()]:
        s = int(rng.integers(0, len(src) - size))
        d += int(rng.integers(0, 40))  # every destination alignment
        jobs.append((s, d, size))
        d += size
    jobs = np.array(jobs, dtype=np.int64)
    dst = np.full(d + 64, 0xEE, dtype=np.uint8)
    want = dst.copy()
    for s, d0, size in jobs.tolist():
        want[d0 : d0 + size] = src[s : s + size]
    jobs.tofile(tmp_path / "jobs")
    src.tofile(tmp_path / "src")
    dst.tofile(tmp_path / "dst")
    gy, threads = launch
    args = [len(jobs), src.size, dst.size, gy, threads]
    subprocess.run([str(binary), str(tmp_path), *map(str, args)], check=True)
    got = np.fromfile(tmp_path / "out", dtype=np.uint8)
    assert np.array_equal(got, want)


def test_the_pack_kernel_moves_16_bytes_per_load_and_store(tmp_path):
    """Its PTX has 16-byte global loads and stores (the byte-wise copy had
    none), and no local memory (the shifted words stay in registers)."""
    ptx = compiled_ptx(PACK_SOURCE, gpu_gather.NVRTC_OPTIONS, tmp_path)
    assert re.search(r"ld\.global(\.nc)?\.v4\.u32", ptx)
    assert re.search(r"st\.global\.v4\.u32", ptx)
    assert ".local" not in ptx


@pytest.mark.parametrize("kernel", ["zarrdali_gather", "zarrdali_gather_finish"])
def test_the_gather_divides_by_rows_not_by_elements(tmp_path, kernel):
    """The gather walks a tile by rows (three 32-bit divisions a row) and
    columns (one a column): no 64-bit integer division is left (the flat index
    cost an emulated one per element, and six 32-bit ones)."""
    source = finish_source() if kernel.endswith("finish") else gather_source(np.dtype("f4"))
    ptx = compiled_ptx(source, gpu_gather.NVRTC_OPTIONS, tmp_path)
    assert not re.search(r"\b(div|rem)\.[su]64\b", ptx), re.findall(r"(div|rem)\.[su]64", ptx)
    assert re.search(r"\bdiv\.s32\b", ptx)  # the ones left: 32-bit
