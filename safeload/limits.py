"""Resource limits. Hostile input must never make safeload use unbounded time or memory."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

GiB = 1 << 30


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_file_bytes: int = Field(default=64 * GiB, gt=0)
    max_opcodes: int = Field(default=50_000_000, gt=0, description="Opcodes per pickle stream")
    max_memo: int = Field(default=5_000_000, gt=0, description="Memo entries per stream")
    max_stack_depth: int = Field(default=1_000_000, gt=0, description="Symbolic stack items")
    max_nesting_depth: int = Field(default=1000, gt=0, description="MARK / container nesting in a stream")
    max_streams: int = Field(default=10_000, gt=0, description="Pickle streams per file")
    max_zip_members: int = Field(default=200_000, gt=0)
    # Decompressed members are held in memory: the default stays well below a typical machine's RAM.
    max_decompressed_bytes: int = Field(default=8 * GiB, gt=0, description="Total across one file")
    max_compression_ratio: int = Field(default=1000, gt=0)
    max_nesting: int = Field(default=4, ge=0, description="Archive-in-archive depth")
    max_int_digits: int = Field(default=4300, gt=0, description="Digits of a LONG literal")

    def merged(self, other: Limits | None) -> Limits:
        """`other`'s explicitly set fields override ours."""
        if other is None:
            return self
        return self.model_copy(update=other.model_dump(exclude_unset=True))


DEFAULT_LIMITS = Limits()
