"""safeload: open pickle-based model files from strangers without running their code."""

from __future__ import annotations

from safeload import errors
from safeload.codes import Severity
from safeload.model import Finding, ScanReport, Verdict

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "Policy",
    "ScanReport",
    "Severity",
    "Verdict",
    "__version__",
    "errors",
    "load",
    "load_policy",
    "loads",
    "scan",
    "scan_bytes",
]


def __getattr__(name: str) -> object:
    # Keep `import safeload` light: policy/api/loader load on first use.
    if name in ("scan", "scan_bytes", "load", "loads"):
        from safeload import api

        value = getattr(api, name)
    elif name in ("Policy", "load_policy"):
        from safeload import policy

        value = getattr(policy, name)
    else:
        raise AttributeError(name)
    globals()[name] = value  # later lookups find it directly, without this hook
    return value
