"""What a loader's ``state_dict`` carries beyond its position, and the checks on load.

A state names the epoch, the batches served in it, the world size they were
served at (and the earlier world sizes of the same epoch, when it was already
resumed elastically: :class:`~zarrdali.sampling.epochs.Segment`) and a fingerprint of
what decides which samples an epoch serves: the store's arrays as read
(names, shapes, dtypes, chunking), the sample spec, the sampling (shuffle,
drop_last, seed, candidates, a sample index's content) and the batch size. A
state whose fingerprint differs from the loader's is refused with an error
listing what differs; a state without one (saved by zarrdali 0.1) is checked
on seed, batch size and candidate count alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from zarrdali.errors import ConfigError
from zarrdali.sampling.epochs import SampleGrid, Sampler, SampleSpec, SampleTable, Segment
from zarrdali.store.open import ArrayLayout


def _digest(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha1()
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def fingerprint(
    layouts: Sequence[ArrayLayout],
    spec: SampleSpec,
    sampler: Sampler,
    candidates: SampleGrid | SampleTable,
) -> dict[str, dict[str, Any]]:
    """Plain values (JSON-safe) of everything that decides an epoch's samples."""
    store = {
        layout.name: f"{layout.dtype.str} {list(layout.shape)} chunks {list(layout.chunk_shape)}"
        for layout in layouts
    }
    sampling: dict[str, Any] = {
        "seed": sampler.seed,
        "shuffle": sampler.shuffle,
        "drop_last": sampler.drop_last,
        "batch_size": sampler.batch_size,
        "candidates": len(candidates),
    }
    if isinstance(candidates, SampleTable):
        sampling["index"] = _digest(candidates.rows, candidates.weights)
    # Lists, not tuples: the same values after a JSON round trip.
    return json.loads(json.dumps({"store": store, "spec": asdict(spec), "sampling": sampling}))


def _differences(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> list[str]:
    out = []
    for part in ("store", "spec", "sampling"):
        a, b = saved.get(part, {}), mine.get(part, {})
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                out.append(
                    f"{part} {key}: state {a.get(key, '(absent)')!r}, "
                    f"loader {b.get(key, '(absent)')!r}"
                )
    return out


def check_state(state: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
    """Refuse ``state`` when it was saved for other samples than ``mine`` describes."""
    if "fingerprint" in state:
        differs = _differences(state["fingerprint"], mine["fingerprint"])
        if differs:
            raise ConfigError(
                "state_dict was saved by a loader serving other samples (another seed, "
                "store or sample spec); resuming would serve the wrong ones. Differences: "
                + "; ".join(differs)
            )
        return
    for key in ("seed", "batch_size", "num_candidates"):  # a state without a fingerprint
        if key in state and state[key] != mine[key]:
            raise ConfigError(
                f"state_dict was saved with {key}={state[key]!r} but this loader has "
                f"{key}={mine[key]!r}; resuming would serve different samples."
            )


def resume_point(state: Mapping[str, Any], world_size: int) -> tuple[list[Segment], int]:
    """The earlier segments of the state's epoch, and the batches to skip.

    At the state's world size: the same segments, and skip the batches served.
    At another: the served part becomes one more segment and the rest of the
    epoch starts from its first batch (:meth:`~zarrdali.sampling.epochs.Sampler.epoch_plan`).
    """
    segments = [Segment(int(w), int(b)) for w, b in state.get("segments", [])]
    served = int(state["batches_served"])
    saved_world = int(state.get("world_size", world_size))
    if saved_world == world_size:
        return segments, served
    return [*segments, Segment(saved_world, served)], 0
