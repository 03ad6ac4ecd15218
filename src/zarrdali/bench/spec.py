"""What a benchmark run loads: one sample spec shared by every loader compared."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class BenchSpec:
    store: str
    variables: tuple[str, ...]
    input_steps: int = 4
    target_steps: int = 2
    tile: tuple[int, int] | None = (128, 128)
    # Where tiles lie: "grid" is the loader's default grid, with a row and a column
    # of tiles flush with the far edges (off the chunk grid where the field is not
    # a multiple of the tile); "chunk-grid" leaves those out, so every tile is
    # whole inner chunks of a store chunked like the tile (a tiling index's
    # placement on such a store): nothing for partial decoding to skip.
    placement: str = "grid"
    batch_size: int = 8
    batches: int = 40  # batches timed per epoch (after warm-up)
    epochs: int = 3  # repeats; median and spread are reported over these
    warmup_batches: int = 4
    seed: int = 0
    num_threads: int | None = None  # None: all cores
    step_ms: float = 0.0  # simulated training step per batch on the consumer side
    cold: bool = False  # drop the store from the page cache before each timed epoch
    storage_options: dict | None = None  # for a URL store: credentials, endpoint
    extra: dict = field(default_factory=dict)

    def at_batch_size(
        self, batch_size: int, samples: int, batches: int | None, warmup: int | None
    ) -> BenchSpec:
        """The spec at ``batch_size``: ``batches`` timed batches per epoch (default:
        ``samples`` timed samples, at least 8 batches) after ``warmup`` (default:
        32 samples, at least 4 batches), so every batch size times about the same
        work. The floors keep large batches honest: a loader's start-up (worker
        processes, the first fill of its prefetch buffers) lies in the warm-up,
        and the timed part is long enough to be its steady state."""
        timed = batches if batches is not None else max(8, -(-samples // batch_size))
        warm = warmup if warmup is not None else max(4, -(-32 // batch_size))
        return replace(self, batch_size=batch_size, batches=timed, warmup_batches=warm)

    @property
    def remote(self) -> bool:
        return "://" in self.store and not self.store.startswith("file://")

    @property
    def budget(self) -> int:
        """Threads or worker processes each loader may use (the same for all)."""
        return self.num_threads or os.cpu_count() or 1

    @property
    def n_frames(self) -> int:
        return self.input_steps + self.target_steps

    def loader_kwargs(self) -> dict:
        return dict(
            variables=list(self.variables),
            input_steps=self.input_steps,
            target_steps=self.target_steps,
            tile=self.tile,
            cover_edges=self.placement != "chunk-grid",
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            storage_options=self.storage_options,
        )

    def to_json(self) -> dict:
        """The spec as written to bench.json: storage options redacted."""
        from zarrdali.io.remote import redact_options, redact_url

        out = asdict(self)
        out["store"] = redact_url(out["store"])
        out["storage_options"] = redact_options(out["storage_options"])
        return out
