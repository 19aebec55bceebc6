"""Static analysis of pickle streams: the opcode walker, the CPython replay cross-check, and
evaluation of what they found against a policy. No I/O; nothing from a file is imported or run."""

from safeload.analysis.evaluate import evaluate_stream
from safeload.analysis.replay import ReaderReplay, ReplayResult, differential, replay_imports
from safeload.analysis.types import UNKNOWN, Anomaly, ImportSite, PersistentIdSite, WalkResult
from safeload.analysis.walker import walk

__all__ = [
    "UNKNOWN",
    "Anomaly",
    "ImportSite",
    "PersistentIdSite",
    "ReaderReplay",
    "ReplayResult",
    "WalkResult",
    "differential",
    "evaluate_stream",
    "replay_imports",
    "walk",
]
