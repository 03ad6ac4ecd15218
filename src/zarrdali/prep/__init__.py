"""Work done once before training, on dask: prepare, stats, index."""
