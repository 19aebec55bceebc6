"""Resource limits. Hostile input must never make safeload use unbounded time or memory."""

from __future__ import annotations

import msgspec

GiB = 1 << 30


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Each limit is a positive int (``max_nesting`` may be 0). A policy file's ``[limits]`` sets
    some of them (validated in safeload.policy_files)."""

    max_file_bytes: int = 64 * GiB
    max_opcodes: int = 50_000_000
    """Opcodes per pickle stream"""
    max_memo: int = 5_000_000
    """Memo entries per stream"""
    max_stack_depth: int = 1_000_000
    """Symbolic stack items"""
    max_nesting_depth: int = 1000
    """MARK / container nesting in a stream"""
    max_streams: int = 10_000
    """Pickle streams per file"""
    max_zip_members: int = 200_000
    # Decompressed members are held in memory: the default stays well below a typical machine's RAM.
    max_decompressed_bytes: int = 8 * GiB
    """Total across one file"""
    max_compression_ratio: int = 1000
    max_nesting: int = 4
    """Archive-in-archive depth"""
    max_int_digits: int = 4300
    """Digits of a LONG literal"""

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            least = least_value(name)
            if type(value) is not int or value < least:
                raise ValueError(f"{name} must be an int of at least {least}, not {value!r}")

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__struct_fields__}


def least_value(name: str) -> int:
    """The smallest value a limit may take."""
    return 0 if name == "max_nesting" else 1


DEFAULT_LIMITS = Limits()
