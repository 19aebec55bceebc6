"""safeload: open pickle-based model files from strangers without running their code."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
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
    "guard_torch_load",
    "load",
    "load_policy",
    "loads",
    "scan",
    "scan_bytes",
]


def __getattr__(name: str) -> object:
    # Keep `import safeload` light: the result types, policy, api, loader, even the rule
    # catalogue and the exceptions load on first use (a replayed audit report needs none of them).
    if name == "errors":
        # Not `from safeload import errors`: that asks this hook again. Importing the submodule
        # sets the attribute on the package.
        import safeload.errors

        value = safeload.errors
    elif name == "Severity":
        from safeload.codes import Severity as value
    elif name in ("Finding", "ScanReport", "Verdict"):
        from safeload import model

        value = getattr(model, name)
    elif name in ("scan", "scan_bytes", "load", "loads"):
        from safeload import api

        value = getattr(api, name)
    elif name == "guard_torch_load":
        from safeload.guard import guard_torch_load as value
    elif name in ("Policy", "load_policy"):
        from safeload import policy

        value = getattr(policy, name)
    else:
        raise AttributeError(name)
    globals()[name] = value  # later lookups find it directly, without this hook
    return value
