"""Replaying an audit report: an unchanged registry, audited the same way again, gets the report
the last audit wrote, without a scan, a cache query per file, or the result models.

"Unchanged" is what the hash cache already trusts (see audit_cache): every walked path reaches the
same file by (device, inode, size, mtime_ns, ctime_ns), linked and named the same way, and no path
was unreadable. "The same way" is everything else a report depends on, all in the key:

- safeload's version (results are cached by it: a replay says what a fully cached run would say);
- the command: paths as given, policy, --allow, --compare, format, --verbose; the working directory
  (SARIF paths are relative to it); the baseline file's bytes;
- every built-in rules file, byte for byte.

Stored beside the report (audit_runs) and checked on replay: the sha256 of each policy file the
audit's policies were built from (as the loader read them; the built-in ones are in the key), and
the day the first unexpired waiver lapses (from then on the report would differ). Any difference is
a miss, and the audit runs as usual.

The report file (``-o``) is judged like the tree: where its status is that of the file the last
run of the key wrote (or found holding the report), it is left unread and the stored report too.

Only reports built from cacheable results are kept (no unreadable file, no finding about the run's
circumstances), so that a replay never repeats a transient failure. ``--rehash`` never replays.

A miss says why (``RunMemo.miss``): each stored report keeps a manifest beside it (the key's parts
and, up to ``MANIFEST_MAX_PATHS``, every walked path with the file state it reached), so that the
next run of the same command can name what changed since: files, the policy, the baseline, the
rules or safeload itself. Without it a registry's re-run is slow for no reason anyone can see.
"""

from __future__ import annotations

import marshal
import os
import time
from stat import S_ISREG

from safeload import __version__, build_id
from safeload import rules as rules_package
from safeload.audit_runs import RunRecord, RunStore
from safeload.audit_walk import Entry, FileGroup, fast_key_records, group, key_records, stat_key, walk
from safeload.keyhash import blake2b, digest
from safeload.text import escape

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import date
    from hashlib import _Hash as Hash

_KEY_FORMAT = 5
_NOT_YET = object()
_MANIFEST_FORMAT = 1
# Past this many walked paths a manifest keeps the key's parts only (a miss then says "files").
MANIFEST_MAX_PATHS = 100_000
# Changed paths a miss names (the rest are counted).
_NAMED_CHANGES = 3
# A policy file larger than this is no policy (the loader refuses it); hashing stops there.
_MAX_POLICY_BYTES = 1 << 20


# Plain classes, not dataclasses or typing.NamedTuple: a replayed audit imports as little as it can.
class RunSpec:
    """Everything besides the files themselves that decides an audit's report."""

    __slots__ = ("paths", "policy", "allow", "compare", "fmt", "verbose", "baseline")

    def __init__(
        self,
        *,
        paths: tuple[str, ...],
        policy: str,
        allow: tuple[str, ...],
        compare: tuple[str, ...],
        fmt: str,
        verbose: bool,
        baseline: str | None,
    ) -> None:
        self.paths = paths
        self.policy = policy
        self.allow = allow
        self.compare = compare
        self.fmt = fmt
        self.verbose = verbose
        self.baseline = baseline

    def values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)


class Replay:
    __slots__ = ("report", "exit_code", "paths", "files", "skipped", "summary")

    def __init__(
        self,
        *,
        report: bytes | None,
        exit_code: int,
        paths: int,
        files: int,
        skipped: int,
        summary: dict[str, int | list[str]],
    ) -> None:
        # UTF-8, as the audit wrote it (written back as it is); None where the output file holds it
        # already (see RunMemo.lookup)
        self.report = report
        self.exit_code = exit_code
        self.paths = paths
        self.files = files
        self.skipped = skipped
        self.summary = summary  # as stored


class RunMemo:
    """Keys the run by a walk of the tree and looks it up. The compiled walk (audit_treewalk) keys
    it where it can; on a miss, the audit walks the tree in Python for its files, and the key is
    taken again from that walk, so that a report is stored under the state it was made from."""

    def __init__(self, runs: RunStore, spec: RunSpec, exclude: Sequence[str], report: str | None) -> None:
        self.runs = runs
        self.spec = spec
        self._exclude, self._report = list(exclude), report
        self.parts = _parts(spec)
        self._entries: list[Entry] | None = None
        # With no run stored, the audit's own walk is the only one: nothing can be replayed.
        records = fast_key_records(spec.paths, exclude, report) if runs.any_stored() else None
        if records is None:
            self._entries = walk(spec.paths, exclude, report)
            records = key_records(self._entries)
        self.key = run_key(spec, records, self.parts)
        # The same command in the same directory: what a miss compares with.
        self.command = digest(repr((os.getcwd(), spec.values())).encode("utf-8", "surrogatepass"))
        self.miss: str | None = None  # after a lookup that found nothing to replay: why
        self._path_states: object = _NOT_YET
        self._groups: list[FileGroup] | None = None
        self._record: RunRecord | None = None  # what lookup read

    @property
    def entries(self) -> list[Entry]:
        """The walk's entries, as the audit takes them (walked in Python on first use)."""
        if self._entries is None:
            self._entries = walk(self.spec.paths, self._exclude, self._report)
            # What changed since the compiled walk changed the key too (the same one otherwise).
            self.key = run_key(self.spec, key_records(self._entries), self.parts)
        return self._entries

    @property
    def groups(self) -> list[FileGroup]:
        """The walk grouped by file, as the audit takes it: built only when there is no replay."""
        if self._groups is None:
            self._groups = group(self.entries)
        return self._groups

    def lookup(self, output: str | None = None) -> Replay | None:
        """The stored report to replay, if any. ``output``: the file the report goes to. Where it
        is the very file (by status, as the hash cache judges files) that a run of this key wrote
        or found holding the report, it is not read again: the replay then has no report to write.
        Call ``replayed`` once the report is written."""
        record = self.runs.get(self.key)
        if record is None:
            self.miss = self._what_changed()
            return None
        if record.valid_until is not None and _today() >= record.valid_until:
            self.miss = f"a waiver in force at the last audit lapsed on {escape(record.valid_until)}"
            return None
        self._record = record
        for label, known in record.sources:
            # Built-in rules files are in the key (every one, byte for byte); a user's policy file
            # (the loader names it by its absolute path) is not. Any other label: not ours to trust.
            builtin = not os.path.isabs(label) and label in _rules_files()
            if not builtin and source_digest(label) != known:
                self.miss = f"the policy file {escape(label)} changed"
                return None
        counts = record.summary
        try:
            replay = Replay(
                report=None,
                exit_code=record.exit_code,
                paths=int(counts["paths"]),  # type: ignore[call-overload]
                files=int(counts["files"]),  # type: ignore[call-overload]
                skipped=int(counts["skipped"]),  # type: ignore[call-overload]
                summary=counts,
            )
        except (ValueError, TypeError, KeyError):
            self.miss = "the stored report is damaged or missing"
            return None  # not what this module stores: audit as usual
        state = _output_state(output) if output is not None else None
        if (
            state is not None
            and counts.get("output") == state
            and self.runs.report_is_whole(self.key, record.length)
        ):
            return replay
        replay.report = self.runs.read_report(self.key, record.length)
        if replay.report is None:
            self.miss = "the stored report is damaged or missing"
            return None
        return replay

    def replayed(self, replay: Replay, output: str | None) -> None:
        """Mark the stored report as used, and remember the output file that now holds it."""
        state = _output_state(output) if output is not None else None
        record = self._record
        if state is None or replay.summary.get("output") == state or record is None:
            self.runs.touch(self.key)
        else:
            record.summary = {**replay.summary, "output": state}
            self.runs.touch(self.key, record)

    def _what_changed(self) -> str:
        found = self.runs.latest_manifest(self.command)
        if found is None:
            return (
                "no report of this audit is stored (the first audit with this cache and command, "
                "or the last one had unreadable files)"
            )
        key, raw = found
        if key == self.key:
            return "the stored report is damaged or missing"
        import json  # here: json imports re, and a replayed audit needs neither

        try:
            manifest = json.loads(raw)
            if manifest.get("format") != _MANIFEST_FORMAT:
                raise ValueError("another format")
            before: dict[str, str] = dict(manifest["parts"])
            files = manifest["files"]
            old_files = None if files is None else {str(p): str(state) for p, state in files}
        except (ValueError, TypeError, KeyError, AttributeError):
            return "the stored report's manifest is damaged"
        labels = {
            "version": "safeload's version",
            # A development build (the same version, other code), or another Python.
            "build": "safeload's code or the Python running it",
            # Development builds change it without a new version; manifests before it have none.
            "key": "the way safeload keys stored audits",
            "rules": "the built-in rules",
            "baseline": "the baseline file",
        }
        changed = [labels[k] for k in labels if before.get(k) != self.parts[k]]
        if before.get("version") != self.parts["version"] and labels["build"] in changed:
            changed.remove(labels["build"])  # a new version is new code: once is enough
        if changed:
            if "version" in before and before["version"] != self.parts["version"]:
                changed[0] += f" ({escape(before['version'])} then, {__version__} now)"
            return " and ".join(changed) + " changed since the stored audit"
        now = self._states()
        if old_files is None or now is None:
            return "the tree changed since the stored audit (too many files to say which)"
        return _tree_changes(old_files, now)

    def _states(self) -> list[tuple[str, str]] | None:
        """The walk's path states (a miss compares them, a store keeps them): made once."""
        if self._path_states is _NOT_YET:
            self._path_states = _file_states(self.groups)
        return self._path_states  # type: ignore[return-value]

    def manifest(self) -> bytes:
        content = {"format": _MANIFEST_FORMAT, "parts": self.parts, "files": self._states()}
        try:
            # msgspec: imported by every audit that stores a run (it scanned), and a few times
            # faster than json for thousands of paths.
            import msgspec

            return msgspec.json.encode(content)
        except UnicodeEncodeError:  # a path that was not UTF-8: json escapes its lone surrogates
            import json

            return json.dumps(content, separators=(",", ":")).encode("utf-8", "surrogatepass")

    def store(
        self,
        report: bytes,
        *,
        exit_code: int,
        paths: int,
        files: int,
        skipped: int,
        sources: Sequence[tuple[str, str]],
        valid_until: date | None,
        output: str | None = None,
    ) -> None:
        """``output``: the file the report was just written to, if any."""
        summary: dict[str, int | list[str]] = {"paths": paths, "files": files, "skipped": skipped}
        state = _output_state(output) if output is not None else None
        if state is not None:
            summary["output"] = state
        record = RunRecord(
            valid_until=None if valid_until is None else valid_until.isoformat(),
            sources=list(sources),
            exit_code=exit_code,
            summary=summary,
            length=len(report),
        )
        self.runs.put(self.key, record, report, manifest=(self.command, self.manifest()))


def _parts(spec: RunSpec) -> dict[str, str]:
    """The key's parts besides the command and the files, as a miss names them."""
    baseline = None if spec.baseline is None else _file_digest(spec.baseline, None)
    return {
        "version": __version__,
        "build": build_id.install_fingerprint(),
        "key": str(_KEY_FORMAT),
        "rules": _rules_digest(),
        "baseline": repr((spec.baseline, baseline)),
    }


def _file_states(groups: Sequence[FileGroup]) -> list[tuple[str, str]] | None:
    """Each walked path with what it reached (the file's stat key, or why it was unreadable)."""
    out: list[tuple[str, str]] = []
    add = out.append
    for g in groups:
        state = stat_key(g.st) if g.st is not None else f"unreadable: {g.error}"
        if len(g.paths) == 1 and not g.links:  # most files: one path, reached directly
            add((g.paths[0], state))
            continue
        for path in dict.fromkeys(g.paths + g.links):
            add((path, state))
        if len(out) > MANIFEST_MAX_PATHS:
            return None
    return None if len(out) > MANIFEST_MAX_PATHS else out


def _tree_changes(before: dict[str, str], now: list[tuple[str, str]]) -> str:
    current = dict(now)
    added = [p for p in current if p not in before]
    gone = [p for p in before if p not in current]
    modified = [p for p in current if p in before and before[p] != current[p]]
    total = len(added) + len(gone) + len(modified)
    if not total:
        return "the tree's links or names changed since the stored audit"
    shown = [f"{escape(p)} (new)" for p in added[:_NAMED_CHANGES]]
    shown += [f"{escape(p)} (gone)" for p in gone[: _NAMED_CHANGES - len(shown)]]
    shown += [f"{escape(p)} (changed)" for p in modified[: _NAMED_CHANGES - len(shown)]]
    more = f" and {total - len(shown)} more" if total > len(shown) else ""
    noun = "path" if total == 1 else "paths"
    return f"{total} {noun} changed since the stored audit: {', '.join(shown)}{more}"


def run_key(spec: RunSpec, records: bytes, parts: dict[str, str] | None = None) -> str:
    """The run's identity: the command, everything besides the files that decides the report, and
    every walked path with the file it reached (``records``: audit_walk.key_records). The grouping
    by file is a function of these (and of the content of files small enough to be refs, which
    their status covers), so it is left out."""
    parts = parts if parts is not None else _parts(spec)
    head = (
        ("safeload audit run", _KEY_FORMAT, parts["version"], parts["build"]),
        os.getcwd(),
        (spec.paths, spec.policy, spec.allow, spec.compare, spec.fmt, spec.verbose),
        parts["baseline"],
        parts["rules"],
    )
    # marshal round-trips, so no two heads give the same bytes, and its data says where it ends, so
    # the records after it cannot be read as part of it; format 0 writes no back-references or
    # interning flags, so the bytes depend on the values alone, not on which objects hold them.
    # BLAKE2b: a key into a trusted cache, hashed at twice sha256's speed on CPUs without SHA-NI.
    hasher = blake2b(marshal.dumps(head, 0), digest_size=32)
    hasher.update(records)
    return hasher.hexdigest()


def _output_state(path: str) -> list[str] | None:
    """[absolute path, stat key] of a report file (JSON's shape of it), None where it is no regular
    file (a link is never taken for the file it points to: the report is written in its place)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [os.path.abspath(path), stat_key(st)] if S_ISREG(st.st_mode) else None


def _today() -> str:
    """The local date as date.today().isoformat() gives it (without importing datetime)."""
    return time.strftime("%Y-%m-%d")


def source_digest(label: str) -> str | None:
    """sha256 of a user's policy file as the policy loader names and hashes it (an absolute path;
    a relative one would be read from the working directory, which the key holds too)."""
    import hashlib  # only for a user's policy file: a replay with built-in policies needs no sha256

    return _file_digest(label, _MAX_POLICY_BYTES, hashlib.sha256())


def _rules_digest() -> str:
    return digest(repr(sorted(_rules_files().items())).encode())


_rules_read: dict[str, str] | None = None


def _rules_files() -> dict[str, str]:
    """A digest of every built-in rules file, by name, read once per process. The package directory
    is read directly when there is one (importlib.resources costs more to start than the lookup)."""
    global _rules_read
    if _rules_read is not None:
        return _rules_read
    folder = os.path.dirname(rules_package.__file__ or "")
    out: dict[str, str] = {}
    if folder and os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".toml"):
                out[name] = _file_digest(os.path.join(folder, name), None, blake2b()) or ""
    else:
        from importlib import resources  # a zipped install: slow to import, so only then

        for item in resources.files("safeload.rules").iterdir():
            if item.name.endswith(".toml"):
                out[item.name] = blake2b(item.read_bytes()).hexdigest()
    _rules_read = out
    return out


def _file_digest(path: str, limit: int | None, hasher: Hash | None = None) -> str | None:
    """The digest (BLAKE2b unless given another hasher) of a file read in pieces (a baseline may
    be large); None past ``limit`` bytes."""
    hasher = blake2b() if hasher is None else hasher
    read = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                read += len(chunk)
                if limit is not None and read > limit:
                    return None
                hasher.update(chunk)
    except OSError as exc:
        return f"unreadable: {exc.errno}"
    return hasher.hexdigest()
