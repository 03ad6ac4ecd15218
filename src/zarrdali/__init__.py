"""zarrdali: a GPU-native training data loader for Earth-science arrays in Zarr v3."""

from __future__ import annotations

from .errors import (
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
from .loader import ZarrLoader
from .plan import SampleSpec

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ChunkError",
    "ConfigError",
    "LoaderClosedError",
    "MetadataError",
    "ProcessContextError",
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
