"""One batch: its chunks, where they lie, the contract every path implements, finishing."""
