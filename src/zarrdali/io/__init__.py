"""Bytes: local files, object stores, the request engine, the disk cache."""
