"""zarrdali: a GPU-native training data loader for Earth-science arrays in Zarr v3."""

from __future__ import annotations

from zarrdali.errors import (
    BackendUnavailableError,
    ChunkError,
    ConfigError,
    LoaderClosedError,
    MetadataError,
    ProcessContextError,
    StoreAccessError,
    StoreNotFoundError,
    StoreUnavailableError,
    UnknownCodecError,
    UnknownDataTypeError,
    VariableNotFoundError,
    WorkerDiedError,
    ZarrDaliError,
)
from zarrdali.loader import ZarrLoader
from zarrdali.options import GpuOptions, LoadingOptions, RemoteOptions
from zarrdali.sampling.epochs import SampleSpec

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ChunkError",
    "ConfigError",
    "GpuOptions",
    "LoaderClosedError",
    "LoadingOptions",
    "MetadataError",
    "ProcessContextError",
    "RemoteOptions",
    "SampleSpec",
    "StoreAccessError",
    "StoreNotFoundError",
    "StoreUnavailableError",
    "UnknownCodecError",
    "UnknownDataTypeError",
    "VariableNotFoundError",
    "WorkerDiedError",
    "ZarrDaliError",
    "ZarrLoader",
    "__version__",
]
