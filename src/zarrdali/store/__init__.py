"""A Zarr v3 store: opening it, its metadata, codecs, dimensions, CF decoding, missing values."""
