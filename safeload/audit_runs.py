"""Whole audit reports kept for replay (see audit_memo), as plain files in ``<cache>/runs``.

Per stored run, named by its key: ``<key>`` (the report's UTF-8 text), ``<key>.record`` (its record:
exit code, summary, policy sources, the date a waiver lapses, the report's length) and
``<key>.<command>.manifest`` (what the report was made from, to explain a later miss). The record
is written last, each file whole or absent (write_atomic), so a record names a complete report.
The record's modification time is when the run was last stored or replayed: the KEEP_RUNS most
recent are kept.

Files, not the cache's SQLite database: a replayed audit then neither imports sqlite3 nor opens
the database (a tenth of a replay of 5,000 files), and there are only ever a few runs to keep.
The directory is as trusted as the rest of the cache: a record that does not parse or does not
describe its report is a miss, never an error.

A record is lines of ASCII words: a field's name, then integers or text written as the hex of its
UTF-8 bytes, so that no path needs escaping and reading one needs neither json (it imports re, and
enum with it: a tenth of a replay's imports) nor any format that can hold code.
"""

from __future__ import annotations

import os
import time

from safeload.atomic import write_atomic

# Replayable reports kept (the most recent): one per tree and way of auditing it.
KEEP_RUNS = 8
_RECORD = ".record"
_MAGIC = "safeload-run-record 1"
_END = "end"  # the last line: a record cut short at a line's end is no shorter record
_MANIFEST = ".manifest"


class RunRecord:
    """What a stored report needs besides its text for a replay."""

    __slots__ = ("valid_until", "sources", "exit_code", "summary", "length")

    def __init__(
        self,
        *,
        valid_until: str | None,
        sources: list[tuple[str, str]],
        exit_code: int,
        summary: dict[str, int | list[str]],
        length: int,
    ) -> None:
        self.valid_until = valid_until  # ISO date from which the report would differ (a waiver lapses)
        self.sources = sources  # (policy source label, its sha256) as the policy loader read them
        self.exit_code = exit_code
        self.summary = summary  # counts, and the output file's [path, stat key]
        self.length = length  # of the report in bytes: a shorter file is a damaged one

    def to_bytes(self) -> bytes:
        lines = [_MAGIC, f"exit_code {int(self.exit_code)}", f"length {int(self.length)}"]
        if self.valid_until is not None:
            lines.append(f"valid_until {_hex(self.valid_until)}")
        lines += [f"source {_hex(label)} {_hex(known)}" for label, known in self.sources]
        for name, value in self.summary.items():
            if isinstance(value, list):
                lines.append(" ".join(["summary-text", _hex(name), *(_hex(v) for v in value)]))
            else:
                lines.append(f"summary-int {_hex(name)} {int(value)}")
        lines.append(_END)
        return ("\n".join(lines) + "\n").encode("ascii")

    @classmethod
    def from_bytes(cls, raw: bytes) -> RunRecord:
        """Raises ValueError for anything that is not a record as to_bytes writes it."""
        try:
            lines = raw.decode("ascii").split("\n")
            if lines[0] != _MAGIC or lines[-2:] != [_END, ""]:
                raise ValueError("another format, or cut short")
            fields: dict[str, int] = {}
            valid_until: str | None = None
            sources: list[tuple[str, str]] = []
            summary: dict[str, int | list[str]] = {}
            for line in lines[1:-2]:
                name, *words = line.split(" ")
                if name in ("exit_code", "length") and len(words) == 1 and name not in fields:
                    fields[name] = _int(words[0])
                elif name == "valid_until" and len(words) == 1 and valid_until is None:
                    valid_until = _text(words[0])
                elif name == "source" and len(words) == 2:
                    sources.append((_text(words[0]), _text(words[1])))
                elif name == "summary-int" and len(words) == 2:
                    summary[_text(words[0])] = _int(words[1])
                elif name == "summary-text" and words:
                    summary[_text(words[0])] = [_text(w) for w in words[1:]]
                else:
                    raise ValueError(f"unexpected line {line[:40]!r}")
            exit_code, length = fields["exit_code"], fields["length"]
        except (ValueError, KeyError) as exc:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"not a run record: {exc}") from None
        if length < 0:
            raise ValueError("not a run record: a negative length")
        return cls(
            valid_until=valid_until, sources=sources, exit_code=exit_code, summary=summary, length=length
        )


def _hex(text: str) -> str:
    return text.encode("utf-8", "surrogatepass").hex()


def _text(word: str) -> str:
    return bytes.fromhex(word).decode("utf-8", "surrogatepass")


def _int(word: str) -> int:
    # int() also takes "+1", " 1" and "1_0": a record holds only what to_bytes writes.
    if not word or not (word.isdigit() or (word[0] == "-" and word[1:].isdigit())) or not word.isascii():
        raise ValueError(f"not an integer: {word[:20]!r}")
    return int(word)


class RunStore:
    """The stored runs of one cache directory. Nothing is created until a run is stored."""

    def __init__(self, cache_root: str | os.PathLike[str]) -> None:
        self.folder = os.path.join(os.fspath(cache_root), "runs")

    def get(self, key: str) -> RunRecord | None:
        """The record stored under ``key``; None where there is none or it is damaged."""
        try:
            with open(self._file(key) + _RECORD, "rb") as f:
                return RunRecord.from_bytes(f.read(1 << 20))
        except (OSError, ValueError):
            return None

    def any_stored(self) -> bool:
        """Whether any run is stored (a first audit with this cache has nothing to look up)."""
        try:
            return any(name.endswith(_RECORD) for name in os.listdir(self.folder))
        except OSError:
            return False

    def read_report(self, key: str, length: int) -> bytes | None:
        """The report stored under ``key``, if it is whole (``length`` bytes)."""
        try:
            with open(self._file(key), "rb") as f:
                report = f.read(length + 1)
        except OSError:
            return None
        return report if len(report) == length else None

    def report_is_whole(self, key: str, length: int) -> bool:
        """Whether the report stored under ``key`` is there and ``length`` bytes long, unread."""
        try:
            return os.stat(self._file(key)).st_size == length
        except OSError:
            return False

    def touch(self, key: str, record: RunRecord | None = None) -> None:
        """Mark a stored run as just used (the KEEP_RUNS kept are the most recently used, and a miss
        is explained against the run the last audit gave); ``record``: a new one to keep."""
        try:
            if record is not None:
                write_atomic(self._file(key) + _RECORD, record.to_bytes(), mode=0o600)
            _mark_used(self._file(key) + _RECORD)
        except OSError:
            pass  # a read-only cache still replays

    def latest_manifest(self, command: str) -> tuple[str, bytes] | None:
        """(run key, manifest) of the most recently used stored run of ``command``, if any."""
        for key in self._keys_by_use():
            try:
                with open(f"{self._file(key)}.{command}{_MANIFEST}", "rb") as f:
                    return key, f.read()
            except OSError:
                continue
        return None

    def put(
        self, key: str, record: RunRecord, report: bytes, manifest: tuple[str, bytes] | None = None
    ) -> None:
        """Store a run, keeping the KEEP_RUNS most recently used. ``manifest``: (command, bytes) that
        say what the report was made from, for explaining a later miss (latest_manifest)."""
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            if manifest is not None:
                write_atomic(f"{self._file(key)}.{manifest[0]}{_MANIFEST}", manifest[1], mode=0o600)
            write_atomic(self._file(key), report, mode=0o600)
            write_atomic(self._file(key) + _RECORD, record.to_bytes(), mode=0o600)
            _mark_used(self._file(key) + _RECORD)
            kept = set(self._keys_by_use()[:KEEP_RUNS])
            kept.add(key)  # however its time compares (a clock set back): it was just stored
            for name in os.listdir(self.folder):
                # <key>, <key>.record and <key>.<command>.manifest go together; a dot first is a
                # temporary file of a write in progress (its writer removes or renames it)
                if not name.startswith(".") and name.split(".", 1)[0] not in kept:
                    try:
                        os.unlink(os.path.join(self.folder, name))
                    except FileNotFoundError:
                        pass  # removed by another audit pruning the same cache
        except OSError:
            pass  # not kept: the next run audits as usual

    def _keys_by_use(self) -> list[str]:
        """Keys of the stored records, the most recently used first."""
        used: list[tuple[int, str]] = []
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        for name in names:
            if name.endswith(_RECORD) and not name.startswith("."):
                try:
                    used.append((os.stat(os.path.join(self.folder, name)).st_mtime_ns, name[: -len(_RECORD)]))
                except OSError:
                    continue
        used.sort(reverse=True)
        return [key for _, key in used]

    def _file(self, key: str) -> str:
        return os.path.join(self.folder, key)


def _mark_used(record_path: str) -> None:
    """Set the record's time to now, at the clock's resolution: the filesystem's own timestamps
    may tick only every few milliseconds, too coarse to order runs stored one after another."""
    now = time.time_ns()
    os.utime(record_path, ns=(now, now))
