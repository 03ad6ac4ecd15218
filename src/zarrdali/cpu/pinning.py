"""Page-locked (pinned) batch buffers for the CPU path (``pin_memory=True``).

A copy to the GPU from pageable memory is staged by the driver and does not
overlap with the host; from page-locked memory ``batch["input"].to("cuda",
non_blocking=True)`` returns at once and the copy runs on the stream. torch's
``DataLoader(pin_memory=True)`` copies every batch into pinned memory; here the
ring's shared memory itself is registered with CUDA (``cudaHostRegister``,
through torch's ``torch.cuda.cudart()``), so the batches handed out, which are
the ring's slots, are pinned without a copy.

A slot may be written again once its batch is dropped, but an asynchronous copy
from it may still be running then. So when a pinned batch's last reference goes,
a CUDA event is recorded on the current stream (where the copy was enqueued, in
the usual training loop) and the slot is written again only after that event
(:class:`StreamFence`). A batch copied on another stream must be dropped after
that stream is synchronized.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from zarrdali.errors import BackendUnavailableError

NO_CUDA = (
    "pin_memory=True but CUDA is not available (torch.cuda.is_available() is False): "
    "the batch buffers are not page-locked."
)


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def check_pin_memory(stacklevel: int = 3) -> bool:
    """Whether pinning can be done here; without CUDA a warning (as torch's
    ``DataLoader`` warns) and False."""
    if cuda_available():
        return True
    warnings.warn(NO_CUDA, UserWarning, stacklevel=stacklevel)
    return False


def _error_name(err: Any) -> str:
    return getattr(err, "name", None) or str(err)


class HostRegistration:
    """``nbytes`` of host memory at ``address`` registered with CUDA (page-locked)
    until :meth:`close` (call before the memory is unmapped)."""

    def __init__(self, address: int, nbytes: int) -> None:
        import torch

        self._cudart = torch.cuda.cudart()
        err = self._cudart.cudaHostRegister(address, nbytes, 0)  # cudaHostRegisterDefault
        if int(err) != 0:
            raise BackendUnavailableError(
                f"pin_memory=True: cudaHostRegister of the batch buffers ({nbytes / 2**20:.0f} "
                f"MiB) failed ({_error_name(err)}). Pass pin_memory=False, or a smaller "
                "batch_size or prefetch."
            )
        self.address = address
        self.nbytes = nbytes

    def close(self) -> None:
        """Unregister. Idempotent."""
        address, self.address = self.address, 0
        if address:
            err = self._cudart.cudaHostUnregister(address)
            if int(err) != 0:
                raise BackendUnavailableError(
                    f"cudaHostUnregister of the batch buffers failed ({_error_name(err)})"
                )


class StreamFence:
    """An event recorded on the current CUDA stream: what was enqueued there
    before (an asynchronous copy from a slot) is done once it has passed."""

    def __init__(self) -> None:
        import torch

        self.event = torch.cuda.Event()
        self.event.record()

    def synchronize(self) -> None:
        self.event.synchronize()


def pinned_copy(array: np.ndarray) -> Any:
    """A copy of ``array`` in torch's pinned memory (a tensor: its caching host
    allocator keeps the memory until copies from it are done)."""
    import torch

    out = torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype, pin_memory=True)
    out.copy_(torch.from_numpy(array))
    return out
