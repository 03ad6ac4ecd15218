"""The CPU path: backend, worker processes, the batch ring, the feed."""
