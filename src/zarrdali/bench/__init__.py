"""Benchmarks: zarrdali against the numcodecs decode ceiling and the usual loaders."""
