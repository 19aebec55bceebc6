"""Container readers: bytes in, pickle streams and a storage index out. Nothing is run."""

from safeload.formats.base import (
    NEST_SEP,
    Budget,
    Child,
    Container,
    PersistentScheme,
    PickleStream,
    ReadContext,
    ReadResult,
    StorageEntry,
    StreamRole,
)
from safeload.formats.detect import open_container

__all__ = [
    "NEST_SEP",
    "Budget",
    "Child",
    "Container",
    "PersistentScheme",
    "PickleStream",
    "ReadContext",
    "ReadResult",
    "StorageEntry",
    "StreamRole",
    "open_container",
]
