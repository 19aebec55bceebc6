"""Orchestration: source -> container -> streams -> walker -> findings -> verdict -> (loader)."""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import IO, Any

import msgspec

from safeload.analysis.budget import ScanBudget
from safeload.analysis.evaluate import evaluate_stream
from safeload.analysis.joblib_arrays import is_wrapper
from safeload.analysis.replay import could_import, differential, replay_imports
from safeload.analysis.types import WalkResult
from safeload.analysis.walker import MAX_IMPORT_SITES, walk
from safeload.codes import Effect
from safeload.errors import (
    DisallowedGlobalError,
    LimitExceededError,
    MalformedPickleError,
    SafeloadError,
    ScanError,
    UnsafeModelError,
    UnsupportedFormatError,
)
from safeload.explain import ExplainBudget, explain
from safeload.formats import raw
from safeload.formats.base import Container, PickleStream, StreamRole
from safeload.formats.detect import open_container
from safeload.formats.joblib_fmt import plain_reading
from safeload.gcpause import fewer_collections
from safeload.model import (
    Finding,
    ScanReport,
    StreamReport,
    Verdict,
    decide,
    make_finding,
    unread_report,
)
from safeload.policy import Policy, load_policy
from safeload.source import Source, describe, from_bytes, open_source, release_pages
from safeload.versions import versions

PolicySpec = str | os.PathLike[str] | Policy

# Scans read files below this size instead of mapping them (a map costs more than a small read).
SMALL_FILE_READ = 1 << 20


class StreamAnalysis(msgspec.Struct):
    stream: PickleStream
    walk: WalkResult
    names: dict[str, int | None]  # qualified names the walk imports -> offset of the first site


class Analysis(msgspec.Struct):
    """A scan's full result: the report, plus what the loader needs to go on from the same bytes."""

    report: ScanReport
    source: Source
    container: Container
    policy: Policy
    streams: list[StreamAnalysis] = msgspec.field(default_factory=list)


def resolve_policy(policy: PolicySpec, allow: Iterable[str] = ()) -> Policy:
    return load_policy(policy, allow=tuple(allow))


@fewer_collections
def analyse(
    source: Source,
    policy: Policy,
    *,
    sha256: bool | str | None = None,
    explain_streams: bool = True,
    pin_streams: bool = False,
) -> Analysis:
    """Scan one read-once buffer. Never raises for bad bytes: problems become findings.

    sha256: True computes the file's hash, False skips it, None computes it only when the policy
    has waivers (hashing costs more than scanning a large checkpoint); a string is the hash the
    caller already computed from ``source.buffer``.
    pin_streams: copy each pickle stream out of a mapped file before walking it, so that the loader
    unpickles the walked bytes even if the file is written in place meanwhile.
    """
    if isinstance(sha256, str):
        digest: str | None = sha256
    else:
        want_hash = sha256 if sha256 is not None else bool(policy.waivers)
        digest = source.sha256() if want_hash else None
    findings: list[Finding] = []
    stream_analyses: list[StreamAnalysis] = []
    stream_reports: list[StreamReport] = []
    container = Container()
    budget = ExplainBudget() if explain_streams else None
    recorded = ScanBudget(policy.limits)
    try:
        # Pages of the file a reader is done with may go (compressed input); with pin_streams the
        # loader may still map storages from the file, so nothing is let go.
        release = None if pin_streams else source.release
        container = open_container(
            source.buffer,
            path=source.path,
            limits=policy.limits,
            release=release,
            peek=source.peek if source.mapped else None,
        )
        findings.extend(recorded.kept(container.findings))
        for stream in container.streams:
            if pin_streams:
                stream = msgspec.structs.replace(stream, data=memoryview(bytes(stream.data)))
            let_go = _stream_release(release, stream, source.mapped)
            walked = _walk(stream, policy, recorded, let_go)
            late = _joblib_after_all(stream, walked)
            pure = _pure_python_reading(stream, walked, policy) if late is None else None
            if pure is not None:
                pairs = [(stream, walked), pure]
            elif late is not None:
                # Read the joblib way, and keep this plain reading as the secondary view it is.
                plain = plain_reading(stream)
                _now_joblib(container, late, plain)
                # One pickle or several makes no difference to a walk that broke in its first.
                reuse = walked if not stream.multi or walked.pickles == 0 else None
                pairs = [(late, None), (plain, reuse)]
            else:
                pairs = [(stream, walked)]
            explained = False
            for one, walk_result in pairs:
                # fickling decompiles the bytes, not a reading of them: one explanation for all.
                explain_this = budget if not explained else None
                analysed, stream_findings, report = _analyse_stream(
                    one, policy, explain_this, walk_result, recorded, let_go
                )
                if len(pairs) == 1 and (no_pickle := _not_a_pickle(one, analysed.walk)) is not None:
                    findings.extend(recorded.kept([no_pickle]))
                    _forget(container, one)
                    continue
                explained = explained or report.explanation is not None
                if one.secondary:
                    # Up to the first array both readings agree: say only what this one adds.
                    said = {_finding_key(f) for f in findings}
                    stream_findings = [f for f in stream_findings if _finding_key(f) not in said]
                stream_analyses.append(analysed)
                findings.extend(stream_findings)
                stream_reports.append(report)
    except SafeloadError as exc:
        findings.append(_finding_from_error(exc))
    except (MemoryError, RecursionError) as exc:
        findings.append(make_finding("SL203", f"resource exhausted while analysing: {type(exc).__name__}"))
    except Exception as exc:  # a safeload bug must fail closed, never pass or crash with a traceback
        findings.append(make_finding("SL207", f"{type(exc).__name__}: {exc}"))
    findings.extend(recorded.summaries())
    if digest is not None:
        findings = [_apply_waiver(f, digest, policy) for f in findings]
    report = ScanReport(
        path=source.path,
        sha256=digest,
        size=source.size,
        formats=tuple(container.formats),
        streams=tuple(stream_reports),
        findings=tuple(findings),
        verdict=decide(findings),
        policy=policy.name,
        policy_hash=policy.hash,
        versions=_versions(),
    )
    return Analysis(report=report, source=source, container=container, policy=policy, streams=stream_analyses)


def _analyse_stream(
    stream: PickleStream,
    policy: Policy,
    explain_budget: ExplainBudget | None,
    walked: WalkResult | None = None,
    budget: ScanBudget | None = None,
    release: Callable[[int, int], None] | None = None,
) -> tuple[StreamAnalysis, list[Finding], StreamReport]:
    result = walked if walked is not None else _walk(stream, policy, release=release)
    if budget is not None:
        budget.take(result, stream)
    if stream.secondary:
        # A plain loader fails where this reading breaks, after importing what the walk saw.
        result.anomalies[:] = [a for a in result.anomalies if a.code not in _EXPECTED_IN_SECONDARY]
    checkable = not any(a.code == "SL203" for a in result.anomalies)
    pure = stream.pure_python or stream.joblib_arrays
    if checkable and could_import(stream.data, result, pure_python=pure):
        replays = replay_imports(
            stream.data,
            multi=stream.multi,
            joblib_arrays=stream.joblib_arrays,
            pure_python=stream.pure_python,
            walk=result,
            release=release,
        )
        result.anomalies.extend(differential(result, replays))
        del replays  # what the readers imported: as many entries as the stream has import sites
    findings, imports = evaluate_stream(
        result,
        policy=policy,
        member=stream.member,
        file_offset=stream.file_offset,
        persistent_scheme=stream.persistent_scheme,
        torchscript=stream.torchscript,
        keep=budget.admit if budget is not None else None,
    )
    listed, omitted, over = (
        budget.listed(imports, stream) if budget is not None else (tuple(imports.rows()), 0, None)
    )
    if over is not None and (budget is None or budget.admit(over.code)):
        findings.append(over)
    explanation = None
    flagged = {f.global_name for f in findings if f.effect is Effect.UNSAFE and f.global_name}
    if explain_budget is not None and any(f.effect is Effect.UNSAFE for f in findings):
        explanation = explain(stream.data, focus=flagged, budget=explain_budget)
    report = StreamReport(
        member=stream.member,
        file_offset=stream.file_offset,
        length=len(stream.data),
        protocol=result.protocol,
        opcodes=result.opcodes,
        globals=listed,
        globals_omitted=omitted,
        explanation=explanation,
        secondary=stream.secondary,
    )
    analysis = StreamAnalysis(stream=stream, walk=result, names=imports.first_offsets())
    return analysis, findings, report


def _not_a_pickle(stream: PickleStream, walked: WalkResult) -> Finding | None:
    """SL204 for bytes read as a pickle only because they start with an opcode byte (a text file
    starting with ``M``, an HDF5 or GGUF header, a Flax msgpack) when no unpickler could act on
    them: they break before any import, call or persistent id, CPython's unpickler replayed over
    them agrees, and they have no pickle's structure either (raw.structured). A broken real pickle
    (a PROTO header) stays SL200. None otherwise.

    Without an import there is no callable: REDUCE, BUILD or OBJ on what the bytes built fail. The
    one lookup allowed is an extension code (EXT1/2/4: a msgpack map of 2 to 4 keys starts with
    one) whose very next opcode breaks: whatever name the process registered for it, if any, is
    looked up and never used. Memo stores between the two use nothing either, even one past the
    memo limit (SL203: a first key such as "rng" reads as LONG_BINPUT to index 2.8 billion): a
    process that has no such extension code fails at the lookup, before it, and one that has
    grows its memo (or fails for memory) and breaks where the walk did."""
    if (
        not stream.guessed
        or walked.pickles
        or walked.imports
        # A persistent id is a call into the loader (its persistent_load), whatever it holds.
        or walked.persistent_ids
        or not any(a.code == "SL200" for a in walked.anomalies)
        or any(a.code not in ("SL200", "SL103", "SL203") for a in walked.anomalies)
        or raw.structured(stream.data)
    ):
        return None
    data = stream.data
    broke = next(a for a in walked.anomalies if a.code == "SL200")
    if data[broke.offset : broke.offset + 1] == pickle.PERSID:
        # pickle.py (joblib.load) hands even a last line without its newline to persistent_load.
        return None
    lookups = [a.offset for a in walked.anomalies if a.code == "SL103"]
    if lookups and (
        len(lookups) > 1
        or data[lookups[0]] not in raw.EXT_ARGUMENT
        or not _only_memo_stores(data, lookups[0] + 1 + raw.EXT_ARGUMENT[data[lookups[0]]], broke.offset)
    ):
        return None
    # A store past the memo limit only behind the lookup, where the check above found memo stores
    # alone: without a lookup before it, a loader grows its memo to the index (gigabytes).
    if any(
        a.code == "SL203" and not (lookups and lookups[0] < a.offset < broke.offset) for a in walked.anomalies
    ):
        return None
    return make_finding(
        "SL204",
        f"no pickle-bearing format recognized: read as a pickle, the bytes break at offset "
        f"{broke.offset} ({broke.message}) before anything is imported or called, so no unpickler "
        "runs anything from them",
        member=stream.member,
        offset=broke.offset,
        file_offset=stream.file_offset,
    )


# Opcodes that copy the top of the stack into the memo and leave it there: no use of it.
_MEMO_STORES = {pickle.BINPUT[0]: 1, pickle.LONG_BINPUT[0]: 4, pickle.MEMOIZE[0]: 0}


def _only_memo_stores(data: memoryview, start: int, stop: int) -> bool:
    """Whether the opcodes from ``start`` up to ``stop`` (where the walk broke) only store the top
    of the stack in the memo (a msgpack key such as "query" reads as BINPUT)."""
    pos = start
    while pos < stop:
        code = data[pos]
        if code == pickle.PUT[0]:
            end = bytes(data[pos:stop]).find(b"\n")
            if end < 0:
                return False
            pos += end + 1
        elif code in _MEMO_STORES:
            pos += 1 + _MEMO_STORES[code]
        else:
            return False
    return pos == stop


def _forget(container: Container, stream: PickleStream) -> None:
    """Drop a stream found to be no pickle, and the pickle format where it was its only stream."""
    container.streams = [s for s in container.streams if s is not stream]
    if not any(s.role is StreamRole.RAW for s in container.streams) and "pickle" in container.formats:
        container.formats.remove("pickle")


# What a secondary reading may do without making the file unscannable: break part way (SL200),
# leave bytes after its pickle (SL201), hold several pickles (SL202).
_EXPECTED_IN_SECONDARY = frozenset({"SL200", "SL201", "SL202"})


def _stream_release(
    release: Callable[[int, int], None] | None, stream: PickleStream, file_mapped: bool
) -> Callable[[int, int], None] | None:
    """How a scan lets go of a stream's pages it has read past, in the stream's offsets: ``release``
    (Source.release, in file offsets) for a stream stored in a mapped file; for one that is all of
    another mapping (the spilled output of a decompressor), that mapping's own. None: nothing
    mapped, or a load (``release`` None), which keeps every page."""
    if release is None:
        return None
    base = stream.file_offset
    if base is not None:
        return (lambda start, end: release(base + start, base + end)) if file_mapped else None
    mapping = getattr(stream.data, "obj", None)
    if isinstance(mapping, mmap.mmap) and stream.data.nbytes == len(mapping):
        return lambda start, end: release_pages(mapping, start, end)
    return None


def _walk(
    stream: PickleStream,
    policy: Policy,
    budget: ScanBudget | None = None,
    release: Callable[[int, int], None] | None = None,
) -> WalkResult:
    if stream.walked is not None:
        # Walked by its reader with the scan's limits: a copy, as the scan adds to its anomalies.
        return stream.walked.with_own_anomalies()
    limits, sites = (
        budget.walk_bounds(policy.limits) if budget is not None else (policy.limits, MAX_IMPORT_SITES)
    )
    return walk(
        stream.data,
        limits=limits,
        multi=stream.multi,
        joblib_arrays=stream.joblib_arrays,
        pure_python=stream.pure_python,
        fold_values=False,
        max_sites=sites,
        release=release,
    )


def _joblib_after_all(stream: PickleStream, walked: WalkResult) -> PickleStream | None:
    """The same stream read the way joblib reads it, when a plain walk broke right where joblib's
    array bytes would start; else None.

    Detection recognizes joblib by an import of its array wrapper in the first few MiB; a file with
    more before its first array (a large vocabulary, say) is only recognized here, by the walk:
    it imported the wrapper, then broke on bytes that follow one.
    """
    if stream.role is not StreamRole.RAW or walked.complete or stream.joblib_arrays or stream.secondary:
        return None
    wrappers = [i.offset for i in walked.imports if is_wrapper(i.module, i.name)]
    breaks = [a.offset for a in walked.anomalies if a.code == "SL200"]
    if not wrappers or not breaks or min(breaks) < min(wrappers):
        return None
    return msgspec.structs.replace(stream, role=StreamRole.JOBLIB, joblib_arrays=True, multi=False)


def _pure_python_reading(
    stream: PickleStream, walked: WalkResult, policy: Policy
) -> tuple[PickleStream, WalkResult] | None:
    """The same stream as pickle.py's unpickler reads it (joblib.load of a plain pickle), when the
    C reading broke and pickle.py's imports more than it did; else None.

    pickle.py reads on only where the C unpickler stops (a FRAME cut short by the end of the
    data, a last line without its newline, INST's import before its MARK is checked), so a stream
    the walk read to its end needs no second reading.
    """
    if (
        stream.role not in _PLAIN_ROLES
        or walked.complete
        or stream.pure_python
        or stream.joblib_arrays
        or stream.secondary
        or any(a.code == "SL203" for a in walked.anomalies)
    ):
        return None
    reading = msgspec.structs.replace(stream, pure_python=True, loadable=False, secondary=True, walked=None)
    pure = _walk(reading, policy)
    seen = {(i.offset, i.module, i.name) for i in walked.imports}
    if all((i.offset, i.module, i.name) in seen for i in pure.imports):
        return None
    return reading, pure


# Whole files (or what a compression wrapper holds) and pickles found by content: what someone
# may hand to joblib.load, which unpickles with pickle.py.
_PLAIN_ROLES = frozenset({StreamRole.RAW, StreamRole.EMBEDDED})


def _now_joblib(container: Container, joblib_reading: PickleStream, plain: PickleStream) -> None:
    """The container as detection would have built it, had it seen the wrapper in time."""
    if "joblib" not in container.formats:
        container.formats.append("joblib")
    loadable = container.meta.get("loadable")
    if joblib_reading.loadable and isinstance(loadable, dict) and loadable.get("member") == plain.member:
        container.meta["loadable"] = {**loadable, "format": "joblib"}
    for i, s in enumerate(container.streams):
        if s.data is plain.data and s.member == plain.member:
            container.streams[i : i + 1] = [joblib_reading, plain]
            break


def _finding_key(f: Finding) -> tuple[object, ...]:
    return (f.code, f.member, f.offset, f.global_name)


def _finding_from_error(exc: SafeloadError) -> Finding:
    code = "SL203" if isinstance(exc, LimitExceededError) else "SL206"
    return make_finding(
        code,
        exc.message,
        member=exc.member,
        offset=exc.offset,
        file_offset=exc.file_offset,
        global_name=exc.global_name,
        remedy=exc.remedy,
    )


def _apply_waiver(finding: Finding, digest: str, policy: Policy) -> Finding:
    if finding.effect is Effect.NONE:
        return finding
    waiver = policy.waiver_for(digest, finding.code, finding.global_name)
    if waiver is None:
        return finding
    return replace(finding, waived=True, waiver_reason=waiver.reason)


def _versions() -> dict[str, str]:
    return dict(versions())


def unreadable_report(path: str, exc: SafeloadError, policy: Policy) -> ScanReport:
    """A report for an input that could not even be read (missing file, over the size limit)."""
    return unread_report(
        path, _finding_from_error(exc), policy=policy.name, policy_hash=policy.hash, versions=_versions()
    )


# -- public API ---------------------------------------------------------------------------------


def scan(
    path: str | os.PathLike[str] | IO[bytes],
    *,
    policy: PolicySpec = "default",
    allow: Iterable[str] = (),
    sha256: bool | None = None,
    regular_only: bool = False,
) -> ScanReport:
    """Scan a file without importing or running anything it names.

    path: a path, or a binary file object (an upload stream, say), read from where it stands to
    its end, at most ``limits.max_file_bytes``; the report names it by its ``name``.
    regular_only: for a file found by walking a directory: anything that is not a regular file
    when it is opened (a FIFO swapped in would block the scan) is reported unreadable.
    """
    resolved = resolve_policy(policy, allow)
    try:
        source = open_scan_source(path, resolved, regular_only=regular_only)
    except SafeloadError as exc:
        return unreadable_report(describe(path), exc, resolved)
    return analyse(source, resolved, sha256=sha256).report


def open_scan_source(
    path: str | os.PathLike[str] | IO[bytes], policy: Policy, *, regular_only: bool = False
) -> Source:
    """The file read once for a scan (mapped, or read when small). Raises SafeloadError."""
    return open_source(
        path,
        # A file object is read to its end: nothing to map.
        use_mmap=isinstance(path, (str, os.PathLike)),
        max_bytes=policy.limits.max_file_bytes,
        read_below=SMALL_FILE_READ,
        regular_only=regular_only,
    )


def scan_bytes(
    data: bytes | bytearray | memoryview,
    *,
    name: str = "<bytes>",
    policy: PolicySpec = "default",
    allow: Iterable[str] = (),
    sha256: bool | None = True,
) -> ScanReport:
    resolved = resolve_policy(policy, allow)
    if len(data) > resolved.limits.max_file_bytes:
        exc = LimitExceededError(f"input is {len(data)} bytes, over the limit", path=name)
        return unreadable_report(name, exc, resolved)
    return analyse(from_bytes(data, name), resolved, sha256=sha256).report


def load(
    f: Any,
    map_location: Any = None,
    pickle_module: Any = None,
    *,
    policy: PolicySpec = "default",
    allow: Iterable[str] = (),
    mmap: bool | None = None,
    framework: str = "auto",
    weights_only: bool | None = None,
    **pickle_load_args: Any,
) -> Any:
    """A drop-in, safe ``torch.load``: scan the bytes, then unpickle those same bytes under the policy.

    ``weights_only`` is accepted for signature compatibility; safeload always restricts loading to
    the policy, whatever it says. ``pickle_module`` must be None: safeload uses its own unpickler.
    """
    if pickle_module is not None:
        raise TypeError("safeload.load does not take pickle_module: it always uses its restricted unpickler")
    resolved = resolve_policy(policy, allow)
    start = _seekable_position(f)
    source = open_source(f, use_mmap=bool(mmap), max_bytes=resolved.limits.max_file_bytes)
    obj, analysis = _load_source(source, resolved, map_location, bool(mmap), framework, pickle_load_args)
    meta = analysis.container.meta
    end = meta.get("end")
    loadable = meta.get("loadable")
    whole_file = isinstance(loadable, dict) and loadable.get("member") is None
    if start is not None and isinstance(end, int) and whole_file:
        # As torch.load leaves a handle after a legacy checkpoint: a second load reads the next.
        f.seek(start + end)
    return obj


def _seekable_position(f: Any) -> int | None:
    """Where a seekable file object stands before the load; None for a path or a stream."""
    if isinstance(f, (str, bytes, os.PathLike)) or not hasattr(f, "read"):
        return None
    try:
        return int(f.tell()) if f.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def loads(
    data: bytes | bytearray | memoryview,
    *,
    policy: PolicySpec = "default",
    allow: Iterable[str] = (),
    map_location: Any = None,
    framework: str = "auto",
    name: str = "<bytes>",
    **pickle_load_args: Any,
) -> Any:
    resolved = resolve_policy(policy, allow)
    source = from_bytes(data, name)
    return _load_source(source, resolved, map_location, False, framework, pickle_load_args)[0]


def _load_source(
    source: Source,
    policy: Policy,
    map_location: Any,
    mmap: bool,
    framework: str,
    pickle_load_args: dict[str, Any],
) -> tuple[Any, Analysis]:
    analysis = analyse(source, policy, explain_streams=False, pin_streams=source.mapped)
    if analysis.report.verdict is not Verdict.SAFE:
        raise refusal(analysis.report)
    from safeload.loader import unpickle

    obj = unpickle(analysis, map_location=map_location, mmap=mmap, framework=framework, **pickle_load_args)
    return obj, analysis


def refusal(report: ScanReport) -> SafeloadError:
    """The exception for a report that is not SAFE, built from its first blocking finding."""
    blocking = [f for f in report.findings if f.effect is not Effect.NONE]
    unsafe = [f for f in blocking if f.effect is Effect.UNSAFE]
    first = (unsafe or blocking)[0]
    where = {
        "path": report.path,
        "member": first.member,
        "offset": first.offset,
        "file_offset": first.file_offset,
        "global_name": first.global_name,
        "remedy": first.remedy,
    }
    if report.verdict is Verdict.UNSAFE:
        from safeload.suggest import allow_snippet, needed_names

        needed = needed_names(report)
        if first.code == "SL101" and len(needed) > 1 and not any(f.code != "SL101" for f in unsafe):
            # A whole model needs several classes: name them all at once, not one per attempt.
            where["remedy"] = (
                f"if you trust this file's source, allow these {len(needed)} globals in a policy file "
                f"(or pass allow=[...] / --allow for each):\n" + allow_snippet(needed)
            )
        if first.code in ("SL100", "SL101"):
            return DisallowedGlobalError(
                f"refusing to load: {first.message}",
                report=report,
                policy=report.policy,
                on_floor=first.code == "SL100",
                **where,
            )
        return UnsafeModelError(f"refusing to load: {first.message}", report=report, **where)
    error_type: type[ScanError] = {
        "SL200": MalformedPickleError,
        "SL201": MalformedPickleError,
        "SL203": LimitExceededError,
        "SL204": UnsupportedFormatError,
    }.get(first.code, ScanError)
    error = error_type(f"cannot load: the file could not be fully analysed: {first.message}", **where)
    error.report = report  # type: ignore[attr-defined]
    return error
