"""What one epoch of a loader costs: first batch, consumer waits, CPU, memory, cold cache.

Every loader that hands out batches is timed by :func:`time_epoch`, so all of
them are measured the same way. Memory and CPU are those of this process and
its children (worker processes), read with psutil; the workers other loaders
started (``RunResult.foreign_pids``, idle while this one runs) are left out.
The benchmark process itself is shared by all loaders.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    pass
    from zarrdali.bench.spec import BenchSpec

T = TypeVar("T")


def _processes(exclude: frozenset[int] = frozenset()):
    """This process and its live descendants (workers) but ``exclude``; [] without psutil."""
    try:
        import psutil
    except ImportError:
        return []
    me = psutil.Process()
    try:
        return [me, *(p for p in me.children(recursive=True) if p.pid not in exclude)]
    except psutil.Error:
        return [me]


def child_pids() -> frozenset[int]:
    """Live descendants of this process (other loaders' idle workers are excluded by pid)."""
    return frozenset(p.pid for p in _processes()[1:])


def _rss_parts(pid: int) -> tuple[int, int] | None:
    """Resident memory of ``pid`` not in shared memory, and in shared memory
    (``RssAnon + RssFile``, ``RssShmem`` of /proc/PID/status, in bytes); None
    where the system does not report them. Counters: reading them is cheap (a
    proportional set size walks the page tables, about 30 ms for 1.6 GB mapped,
    which sampled every 100 ms in every process would take a core)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"RssAnon:", b"RssFile:", b"RssShmem:")):
                    key, value = line.split(b":", 1)
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        return None
    if len(fields) < 3:
        return None
    return fields[b"RssAnon"] + fields[b"RssFile"], fields[b"RssShmem"]


def tree_rss(exclude: frozenset[int] = frozenset()) -> int:
    """Resident memory of this process and its children but ``exclude``, in bytes.

    Shared memory (a ring of batch buffers mapped by the workers and the
    training process) counts once, at its largest in any one process, not once
    per process; the rest is summed as resident sizes are.
    """
    total = shared = 0
    for proc in _processes(exclude):
        try:
            parts = _rss_parts(proc.pid)
            if parts is None:
                total += proc.memory_info().rss
                continue
            total += parts[0]
            shared = max(shared, parts[1])
        except Exception:  # a worker that exited between listing and reading
            continue
    return total + shared


def cpu_seconds(exclude: frozenset[int] = frozenset()) -> float:
    """CPU time (user + system) of this process, its children but ``exclude``, reaped ones."""
    total = 0.0
    for k, proc in enumerate(_processes(exclude)):
        try:
            t = proc.cpu_times()
        except Exception:
            continue
        total += t.user + t.system
        if k == 0:  # children that exited and were waited for
            total += t.children_user + t.children_system
    return total


class PeakMemory:
    """Samples :func:`tree_rss` (and with ``gpu``, :func:`gpu_used_bytes`) in a
    background thread; ``peak`` (and ``gpu_peak``) once exited.

    One sample scans /proc (about 1 ms here): every 20 ms that took 5% of a
    core from the loader being measured, so it samples every 100 ms.
    """

    def __init__(
        self, interval_s: float = 0.1, exclude: frozenset[int] = frozenset(), gpu: bool = False
    ) -> None:
        self.interval_s, self.exclude, self.gpu = interval_s, exclude, gpu
        self.peak = 0
        self.gpu_peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.exclude))
            if self.gpu:
                used = gpu_used_bytes()
                if used is not None:
                    self.gpu_peak = max(self.gpu_peak or 0, used)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.exclude))
        if self.gpu:
            used = gpu_used_bytes()
            if used is not None:
                self.gpu_peak = max(self.gpu_peak or 0, used)


def reset_gpu_peak() -> None:
    # Only looks at a GPU library something else already imported: never
    # initializes CUDA on a machine that does not use it.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_bytes() -> int | None:
    """Peak GPU memory held by torch and CuPy's pool since the reset (None: no GPU used)."""
    total, seen = 0, False
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        total += torch.cuda.max_memory_reserved()
        seen = True
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            total += cupy.get_default_memory_pool().total_bytes()
            seen = True
        except Exception:  # CuPy imported but no usable device
            pass
    return total if seen else None


def gpu_used_bytes() -> int | None:
    """Memory in use on the current GPU, whatever holds it (CUDA contexts, DALI's,
    CuPy's and torch's pools), from ``cudaMemGetInfo``; None without CuPy or a GPU.
    Only asked for rows that use the GPU, so it never initializes CUDA elsewhere."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return None
    try:
        free, total = cupy.cuda.runtime.memGetInfo()
    except Exception:  # CuPy imported but no usable device
        return None
    return int(total - free)


def drop_page_cache(store: str) -> str | None:
    """Ask the OS to drop the store's files from the page cache; the reason if it cannot.

    ``posix_fadvise(POSIX_FADV_DONTNEED)`` needs no root (unlike writing to
    /proc/sys/vm/drop_caches); pages another process holds mapped may stay.
    """
    if not hasattr(os, "posix_fadvise"):
        return "os.posix_fadvise is not available on this platform"
    root = Path(store)
    if not root.is_dir():
        return f"{store} is not a local directory"
    try:
        for path in root.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    except OSError as err:
        return f"posix_fadvise failed: {err}"
    return None


def time_epoch(
    spec: BenchSpec,
    result: RunResult,
    batches: Callable[[], Iterator[T]],
    n_timed: int,
    size: Callable[[T], int],
    ready: Callable[[T], None] | None = None,
) -> None:
    """One epoch: ``spec.warmup_batches`` untimed batches, then ``n_timed`` timed ones.

    Records the time to the first batch (from creating the iterator), the
    timed epoch's wall time, the time the consumer spent waiting for a batch
    (in ``next``, and in ``ready(batch)``: for a batch on the GPU, until its
    device work is done) while it simulated a training step of ``spec.step_ms``
    per batch, CPU time, and peak host and GPU memory over the whole epoch
    (with ``result.uses_gpu``, also the device's memory in use, sampled).
    """
    step_s = spec.step_ms / 1e3
    foreign = result.foreign_pids  # other loaders' (idle) workers
    reset_gpu_peak()
    with PeakMemory(exclude=foreign, gpu=result.uses_gpu) as mem:
        start = time.perf_counter()
        it = batches()
        first = next(it)
        if ready is not None:
            ready(first)
        result.first_batch_seconds.append(time.perf_counter() - start)
        pending = [] if spec.warmup_batches else [first]  # no warm-up: the first is timed
        # A batch held is a buffer the loader cannot refill: a training loop lets
        # go of each batch, and so does the benchmark (holding the first one took
        # a ring slot from the CPU path for the whole epoch: 0.6x at batch 256).
        first = None
        for _ in range(spec.warmup_batches - 1):
            next(it)
        if spec.cold:
            reason = drop_page_cache(spec.store)
            result.cache = "cold" if reason is None else f"warm (could not drop: {reason})"
        samples, waited = 0, 0.0
        cpu0, t0 = cpu_seconds(foreign), time.perf_counter()
        for _ in range(n_timed):
            w = time.perf_counter()
            batch = pending.pop() if pending else next(it)
            if ready is not None:
                ready(batch)
            waited += time.perf_counter() - w
            samples += size(batch)
            if step_s:
                time.sleep(step_s)  # the training step the consumer would run
        elapsed = time.perf_counter() - t0
        result.cpu_seconds.append(cpu_seconds(foreign) - cpu0)
        close = getattr(it, "close", None)
        if close is not None:
            close()
    result.epoch_seconds.append(elapsed)
    result.wait_seconds.append(waited)
    result.samples_per_epoch = samples
    result.peak_rss_bytes = max(result.peak_rss_bytes, mem.peak)
    gpu = gpu_peak_bytes()
    if gpu is not None:
        result.peak_gpu_bytes = max(result.peak_gpu_bytes or 0, gpu)
    if mem.gpu_peak is not None:
        result.peak_gpu_used_bytes = max(result.peak_gpu_used_bytes or 0, mem.gpu_peak)


@dataclass
class RunResult:
    name: str
    epoch_seconds: list[float] = field(default_factory=list)
    samples_per_epoch: int = 0
    decoded_bytes_per_epoch: int = 0  # bytes of chunks decoded (0: not applicable)
    note: str = ""
    status: str = "ok"  # "ok", "failed" or "skipped"
    error: str = ""  # why it failed or was skipped
    first_batch_seconds: list[float] = field(default_factory=list)
    wait_seconds: list[float] = field(default_factory=list)  # consumer waiting in next()
    cpu_seconds: list[float] = field(default_factory=list)  # process + children, timed part
    peak_rss_bytes: int = 0  # process + children, whole epochs
    peak_gpu_bytes: int | None = None  # torch's + CuPy's pools; None: no GPU used
    uses_gpu: bool = False  # sample the device's memory in use while it runs
    peak_gpu_used_bytes: int | None = None  # device memory in use (all holders), sampled
    cache: str = "warm"  # "cold" when --cold could drop the store's pages
    own_pids: set[int] = field(default_factory=set)  # worker processes this loader started
    foreign_pids: frozenset[int] = frozenset()  # other loaders' workers, left out of figures

    def samples_per_s(self) -> list[float]:
        return [self.samples_per_epoch / s for s in self.epoch_seconds]

    def decoded_gb_per_s(self) -> list[float]:
        return [self.decoded_bytes_per_epoch / s / 1e9 for s in self.epoch_seconds]
