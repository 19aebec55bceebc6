"""Exception hierarchy. Fields carry the facts; messages are generated from them."""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from safeload.text import escape

if TYPE_CHECKING:
    from safeload.model import Finding, ScanReport


class SafeloadError(Exception):
    """Base class of every error safeload raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        member: str | None = None,
        offset: int | None = None,
        global_name: str | None = None,
        remedy: str | None = None,
        file_offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.member = member
        self.offset = offset  # inside the member's pickle stream
        self.file_offset = file_offset  # from the start of the file, when the bytes are stored there
        self.global_name = global_name
        self.remedy = remedy

    def diagnostics(self) -> str:
        """Multi-line text: what happened, where, and what the user can do."""
        lines = [self.message]
        where = []
        if self.path is not None:
            where.append(f"file {escape(self.path)}")
        if self.member:
            where.append(f"member {escape(self.member)}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        if self.file_offset is not None and (self.member or self.offset is None):
            where.append(f"byte {self.file_offset} of the file")
        if where:
            lines.append("  at " + ", ".join(where))
        if self.global_name:
            lines.append(f"  global {escape(self.global_name)}")
        if self.remedy:
            lines.append("  what you can do: " + self.remedy)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.diagnostics()


class PolicyError(SafeloadError, ValueError):
    """A policy file or name is invalid. CLI exit 3."""


class ScanError(SafeloadError):
    """Something could not be fully analysed. CLI exit 2."""


class UnsupportedFormatError(ScanError):
    """The bytes are not a format safeload can read."""


class MalformedPickleError(ScanError, pickle.UnpicklingError):
    """A pickle stream could not be parsed to its end."""


class LimitExceededError(ScanError):
    """A resource limit (size, opcodes, memo, nesting, ...) was hit."""


class UnsafeModelError(SafeloadError, pickle.UnpicklingError):
    """The file is not SAFE under the policy; nothing was loaded."""

    def __init__(self, message: str, *, report: ScanReport | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.report = report
        self.findings: list[Finding] = list(report.findings) if report is not None else []

    def diagnostics(self) -> str:
        text = super().diagnostics()
        if self.report is not None and self.findings:
            extra = [f.render() for f in self.findings[:20]]
            if len(self.findings) > 20:
                extra.append(f"... and {len(self.findings) - 20} more findings")
            text += "\n" + "\n".join(extra)
        return text


class DisallowedGlobalError(UnsafeModelError):
    """A global the policy does not allow was met."""

    def __init__(
        self,
        message: str,
        *,
        policy: str | None = None,
        on_floor: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.policy = policy
        self.on_floor = on_floor


class InternalLoaderError(SafeloadError, pickle.UnpicklingError):
    """The restricted unpickler met something the scan did not report: a safeload bug, fail closed."""


class LoadError(SafeloadError, pickle.UnpicklingError):
    """The scan passed but the data could not be rebuilt safely.

    Tensor metadata outside its storage, a storage whose size disagrees with its declaration, an
    unavailable device or a missing optional package: nothing from the file ran, nothing was returned.
    """
