"""Format detection: every reader whose content test matches reads the buffer; wrappers nest.

Decided by content only. A buffer can be several formats at once (a pickle with a zip appended,
a tar that is also a pickle ...): every matching reader reads it and every view is scanned (SL308
when more than one carries pickles). Members and decompressed bytes that readers hand back as
children are read again the same way, to ``limits.max_nesting`` levels.

Some readers are a more exact reading of bytes another reader also claims; their result replaces
the other one's (its findings stay): the legacy torch sequence is a raw pickle sequence read the way
torch reads it, joblib a pickle with array bytes in it, the legacy torch tar a tar, npz a zip.

Exactly one stream ends up ``loadable``: the one the real loader of the file's top-level format
would unpickle (torch.load's choice first: zip when the file starts with a local header, then the
legacy formats, then a plain pickle).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import msgspec

from safeload.codes import Effect
from safeload.formats import raw
from safeload.formats.base import Budget, Child, Container, PickleStream, ReadContext, ReadResult
from safeload.limits import Limits
from safeload.model import Finding, make_finding
from safeload.text import escape


def _registry() -> list[tuple[str, ModuleType]]:
    """(label, reader module), in priority order: which stream is loadable, which view comes first.

    Every import may fail (a reader not written yet, an optional dependency missing): that reader is
    skipped, the others still run. Imports are spelled out: nothing is imported by computed name.
    """
    readers: list[tuple[str, ModuleType]] = []
    try:
        from safeload.formats import torchzip

        readers.append(("torch-zip", torchzip))
    except ImportError:
        pass
    try:
        from safeload.formats import legacy

        readers.append(("torch-legacy", legacy))
    except ImportError:
        pass
    try:
        from safeload.formats import numpy_fmt

        readers.append(("numpy", numpy_fmt))
    except ImportError:
        pass
    try:
        from safeload.formats import joblib_fmt

        readers.append(("joblib", joblib_fmt))
    except ImportError:
        pass
    try:
        from safeload.formats import safetensors_fmt

        readers.append(("safetensors", safetensors_fmt))
    except ImportError:
        pass
    try:
        from safeload.formats import compressed

        readers.append(("compressed", compressed))
    except ImportError:
        pass
    try:
        from safeload.formats import archives

        readers.append(("archive", archives))
    except ImportError:
        pass
    readers.append(("pickle", raw))
    return readers


_READERS = _registry()
_PRIORITY = {label: i for i, (label, _) in enumerate(_READERS)}

# A result of the key format replaces results of these formats on the same buffer.
_SUPERSEDES: dict[str, frozenset[str]] = {
    "torch-legacy": frozenset({"pickle"}),
    "torch-legacy-tar": frozenset({"tar"}),
    "joblib": frozenset({"pickle"}),
    "npz": frozenset({"zip"}),
}

# Readers whose children *are* the file's content (a compressed file), not members of it: they are
# judged like a whole file (ambiguous bytes read as a pickle, unknown bytes SL204).
_TRANSPARENT = frozenset({"compressed"})


class _View(msgspec.Struct):
    """One reader's result for one buffer, and where it sits."""

    label: str
    result: ReadResult
    depth: int
    member: str | None
    whole: bool  # the file itself, or its content through compression only (may hold the loadable stream)
    pickles: int = 0  # streams in this view and everything nested under it


class _State(msgspec.Struct):
    path: str
    limits: Limits
    budget: Budget
    views: list[_View] = msgspec.field(default_factory=list)
    findings: list[Finding] = msgspec.field(default_factory=list)
    streams: int = 0  # pickle streams read so far, in the order _merge takes them


def open_container(
    buf: memoryview,
    *,
    path: str,
    limits: Limits,
    release: Callable[[int, int], None] | None = None,
    peek: Callable[[int, int], bytes | memoryview] | None = None,
) -> Container:
    """Read a buffer into streams, storages and findings. Never raises on bad bytes.

    release: drops pages of ``buf`` (a mapped file) that a reader has read through for good.
    peek: reads ``buf[offset:offset + size]`` without mapping its page (Source.peek).
    """
    buf = buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
    state = _State(path=path, limits=limits, budget=Budget(limits.max_decompressed_bytes))
    if len(buf) > limits.max_file_bytes:
        state.findings.append(
            make_finding(
                "SL203", f"file is {len(buf)} bytes, over max_file_bytes ({limits.max_file_bytes}); not read"
            )
        )
        return Container(findings=state.findings)
    ctx = ReadContext(
        path=path,
        member=None,
        file_offset=0,
        depth=0,
        limits=limits,
        budget=state.budget,
        release=release,
        peek_file=peek,
    )
    _read(buf, ctx, state, whole=True)
    return _merge(state)


def _read(buf: memoryview, ctx: ReadContext, state: _State, *, whole: bool) -> int:
    """Read one buffer with every matching reader; returns how many streams it (and its children) hold."""
    views: list[_View] = []
    for label, module in _READERS:
        if module is raw and whole and not views:
            # Alone, a whole file that starts with an opcode is read as a pickle whatever the
            # strict sniff says (below): skip that opcode scan, the walk decides.
            break
        result = _run(label, module, buf, ctx, state)
        if result is not None:
            views.append(_View(label, result, ctx.depth, ctx.member, whole))
    if len(views) > 1:
        views = _supersede(views, state)
        views = _without_member_archives(views)
    if not views:
        if whole and len(buf) and raw.is_opcode(buf[0]):
            # Starts like a pickle but fits no format: a loader would try to unpickle it, so the
            # walker decides (a clean parse is needed for SAFE; garbage becomes SL200).
            views.append(_View("pickle", raw.read(buf, ctx, guessed=True), ctx.depth, ctx.member, whole))
        elif whole:
            state.findings.append(
                make_finding(
                    "SL204",
                    "no pickle-bearing format recognized"
                    + (f" in {len(buf)} bytes" if buf else ": the input is empty"),
                    member=ctx.member,
                    file_offset=ctx.file_offset,
                )
            )
            return 0
    total = 0
    for view in views:
        state.views.append(view)
        view.pickles = len(view.result.streams)
        state.streams += view.pickles
        for child in view.result.children:
            if state.streams > state.limits.max_streams:
                # _merge keeps the first max_streams streams and says the rest were not scanned;
                # reading the other members would be work thrown away (199,000 members: 9 s).
                break
            view.pickles += _read_child(child, view, ctx, state)
        total += view.pickles
    bearing = [v for v in views if v.pickles]
    if len(bearing) > 1:
        state.findings.append(
            make_finding(
                "SL308",
                "readable as " + ", ".join(v.result.format for v in bearing) + "; every view was scanned",
                member=ctx.member,
                file_offset=ctx.file_offset,
            )
        )
    return total


def _run(
    label: str, module: ModuleType, buf: memoryview, ctx: ReadContext, state: _State
) -> ReadResult | None:
    """One reader on one buffer. A reader that crashes is a finding, never an escaping exception."""
    step = "recognizing"
    try:
        if not module.sniff(buf):
            return None
        step = "reading"
        result: ReadResult = module.read(buf, ctx)
        return result
    except Exception as exc:  # noqa: BLE001 - hostile bytes must never take the scan down: fail closed
        state.findings.append(
            make_finding(
                "SL207",
                f"the {label} reader failed while {step} this input: {type(exc).__name__}: {escape(str(exc))}",
                member=ctx.member,
                file_offset=ctx.file_offset,
            )
        )
        return None


def _read_child(child: Child, view: _View, ctx: ReadContext, state: _State) -> int:
    member = ctx.child_member(child.name)
    if ctx.depth + 1 > state.limits.max_nesting:
        state.findings.append(
            make_finding(
                "SL203",
                f"nested deeper than max_nesting ({state.limits.max_nesting}); this member was not read",
                member=member,
                file_offset=child.file_offset,
            )
        )
        return 0
    sub = ReadContext(
        path=ctx.path,
        member=member,
        file_offset=child.file_offset,
        depth=ctx.depth + 1,
        limits=state.limits,
        budget=state.budget,
        encoding=child.encoding,
    )
    pickles = _read(child.data, sub, state, whole=view.label in _TRANSPARENT)
    if pickles and child.verify_if_pickled is not None:
        state.findings.extend(child.verify_if_pickled())
    return pickles


def _supersede(views: list[_View], state: _State) -> list[_View]:
    formats = {v.result.format for v in views}
    replaced = set().union(*(_SUPERSEDES.get(f, frozenset()) for f in formats)) if formats else set()
    if not replaced.intersection(formats):
        return views  # nothing superseded (the common case): every view is kept as it is
    kept = [v for v in views if v.result.format not in replaced]
    seen = {(f.code, f.member) for v in kept for f in v.result.findings}
    for v in views:
        if v.result.format in replaced:
            # The more exact reading wins; what the other one noticed about the bytes still counts.
            state.findings.extend(f for f in v.result.findings if (f.code, f.member) not in seen)
    return kept


def _without_member_archives(views: list[_View]) -> list[_View]:
    """Drop a zip reading whose archive is exactly the bytes of a member another reading of the same
    buffer hands on: a checkpoint stored in a tar (a SageMaker model.tar.gz) ends the tar, so the
    search for an end record from the buffer's end finds the checkpoint's, offsets counted from the
    member's start. That archive is the member, read at the next level with every check there; read
    here as well, the tar's headers before it would count as bytes put in front of a zip and its
    padding after it as appended ones. Where the spans differ in any way (a directory beyond the
    member, an end record in a later member) both readings stay, as every polyglot's do."""
    members = [
        (view, child.offset, child.offset + len(child.data))
        for view in views
        for child in view.result.children
        if child.offset is not None
    ]
    if not members:
        return views
    kept = []
    for view in views:
        span = view.result.archive_span
        if (
            span is not None
            and span[0] > 0
            and any(
                other is not view and start == span[0] and span[1] <= end for other, start, end in members
            )
        ):
            continue
        kept.append(view)
    return kept


def _merge(state: _State) -> Container:
    container = Container(findings=list(state.findings))
    chosen: tuple[tuple[int, int, int], _View, PickleStream] | None = None
    order = 0
    for view in state.views:
        result = view.result
        if result.format not in container.formats:
            container.formats.append(result.format)
        container.findings.extend(result.findings)
        for stream in result.streams:
            order += 1
            # A member of an archive is not what the file's loader unpickles; content behind
            # compression is (joblib and torch read through it).
            if stream.loadable and view.whole:
                rank = (view.depth, _PRIORITY.get(view.label, len(_PRIORITY)), order)
                if chosen is None or rank < chosen[0]:
                    chosen = (rank, view, stream)
    limit = state.limits.max_streams
    for view in state.views:
        for stream in view.result.streams:
            if len(container.streams) >= limit:
                container.findings.append(
                    make_finding(
                        "SL203", f"more than max_streams ({limit}) pickle streams; the rest were not scanned"
                    )
                )
                break
            if stream.loadable and (chosen is None or stream is not chosen[2]):
                stream = msgspec.structs.replace(stream, loadable=False)
            container.streams.append(stream)
        else:
            continue
        break
    if chosen is not None:
        _, view, stream = chosen
        container.storages = dict(view.result.storages)
        container.meta = dict(view.result.meta)
        container.meta["loadable"] = {"format": view.result.format, "member": stream.member}
    container.meta["views"] = [{"format": v.result.format, "member": v.member} for v in state.views]
    # Say so when a readable file holds no pickle at all (not when something could not be read).
    quiet = all(f.effect is Effect.NONE and f.code != "SL400" for f in container.findings)
    if state.views and not container.streams and quiet:
        container.findings.append(
            make_finding(
                "SL400", f"no pickle in this {'/'.join(container.formats)} file: nothing in it is unpickled"
            )
        )
    return container
