"""Bounds checks for storages and the tensor views made over them. Pure Python, no torch.

Every number here comes from the file. A view is made only after these checks prove that it lies
inside its storage, so no backend ever reads (or lets a caller write) outside the scanned buffer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from safeload.errors import LoadError
from safeload.text import escape

if TYPE_CHECKING:
    from safeload.formats.base import StorageEntry

# torch and numpy index with int64; anything larger cannot be a real shape, stride or offset.
INT64_MAX = (1 << 63) - 1


class Where(msgspec.Struct, frozen=True):
    """Where the object being loaded sits, for messages."""

    path: str
    member: str | None = None

    def error(self, message: str) -> LoadError:
        return LoadError(message, path=self.path, member=self.member)


def check_int(value: object, what: str, where: Where, *, minimum: int = 0) -> int:
    # bool is an int subclass; torch.save never writes one where a size belongs.
    if type(value) is not int:
        raise where.error(f"{what} must be an integer, not {type(value).__name__}")
    if value < minimum or value > INT64_MAX:
        raise where.error(f"{what} {value} is out of range")
    return value


def check_dims(values: object, what: str, where: Where, *, minimum: int = 0) -> tuple[int, ...]:
    """A shape or stride: a tuple (or torch.Size / list) of bounded non-negative ints."""
    if not isinstance(values, (tuple, list)):
        raise where.error(f"{what} must be a tuple of integers, not {type(values).__name__}")
    if len(values) > 64:
        raise where.error(f"{what} has {len(values)} dimensions; at most 64 are supported")
    for v in values:
        # Checked inline (this runs for every tensor); the message is built only on failure.
        if type(v) is not int or v < minimum or v > INT64_MAX:
            for i, item in enumerate(values):
                check_int(item, f"{what}[{i}]", where, minimum=minimum)
    return tuple(values)


def numel(size: Sequence[int]) -> int:
    n = 1
    for s in size:
        n *= s
    return n


def check_view(
    offset: object,
    size: object,
    stride: object,
    storage_elements: int,
    where: Where,
    *,
    what: str = "tensor",
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Prove that a strided view (in elements) lies inside a storage of `storage_elements` elements.

    Returns the checked (offset, size, stride). Python integers do not overflow, so the extent is
    exact; it is also kept under int64 so the backends' own arithmetic cannot wrap.
    """
    off = check_int(offset, f"{what} storage offset", where)
    dims = check_dims(size, f"{what} size", where)
    steps = check_dims(stride, f"{what} stride", where)
    if len(dims) != len(steps):
        raise where.error(f"{what} has {len(dims)} sizes but {len(steps)} strides")
    count = 1
    last = off
    for d, s in zip(dims, steps, strict=True):
        count *= d
        last += (d - 1) * s
    if count > INT64_MAX:
        raise where.error(f"{what} has more elements than int64 can count")
    if count == 0:
        # An empty view reads nothing, whatever its offset: torch's bounds check returns early for
        # zero bytes and keeps the offset as written, so torch.load accepts it and so does safeload.
        # Backends that address memory with it clamp it to the storage.
        return off, dims, steps
    if last >= storage_elements or last > INT64_MAX:
        raise where.error(
            f"{what} reaches element {last} but its storage holds {storage_elements} elements "
            "(offset, size or stride out of bounds: the file is corrupt or crafted)"
        )
    return off, dims, steps


def check_storage_bytes(
    actual: int, declared_numel: object, element_size: int, key: str, where: Where
) -> int:
    """A storage's bytes must be exactly what its persistent id declares (numel * element size)."""
    n = check_int(declared_numel, f"storage {key!r} numel", where)
    expected = n * element_size
    if expected != actual:
        raise where.error(
            f"storage {key!r} holds {actual} bytes but its persistent id declares {n} elements "
            f"of {element_size} bytes ({expected} bytes): the file is corrupt or crafted"
        )
    return n


def ascii_text(value: object) -> str:
    """torch's _maybe_decode_ascii: Python 2 files give bytes under encoding='bytes'."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value if isinstance(value, str) else repr(value)


def parse_zip_pid(pid: object, where: Where) -> tuple[object, str, object, object]:
    """A torch zip persistent id ('storage', storage_type, key, location, numel), checked as torch's
    _load reads it; returns (storage_type, key, location, numel). Both backends go through here."""
    if type(pid) is not tuple or len(pid) != 5:
        raise where.error("persistent id is not a 5-tuple ('storage', type, key, location, numel)")
    typename, storage_type, key, location, count = pid
    if ascii_text(typename) != "storage":
        raise where.error(f"persistent id of kind {escape(typename)}; only 'storage' is defined")
    if type(key) is not str:
        raise where.error("persistent id storage key is not a string")
    return storage_type, key, location, count


def shared_view_key(
    view_key: str, loaded: Mapping[str, tuple[Any, ...]], storages: Mapping[str, StorageEntry], where: Where
) -> tuple[Any, ...] | None:
    """torch's legacy loader keeps storages and their views in one table: a view key that names a
    storage loaded already is that storage (whole, its own dtype), as there; one that names a
    storage still to come would have torch fill that storage's bytes into the view: refused."""
    if view_key in loaded:
        return loaded[view_key]
    if view_key in storages:
        raise where.error(
            f"legacy storage view key {escape(view_key)} is also the key of a storage loaded after it: "
            "torch.load would write that storage's bytes into the view; the file is crafted"
        )
    return None


def check_flags(metadata: object, where: Where) -> None:
    """A rebuild's metadata (torch's conj/neg bits): None or a dict of flags."""
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(type(k) is str and type(v) is bool for k, v in metadata.items())
    ):
        raise where.error("tensor metadata is not a dict of flags")
