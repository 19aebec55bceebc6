"""What one file's scan may take on and record, across all its pickle streams.

The walker bounds each stream (opcodes, memo, import sites, anomalies); a file may hold thousands
of streams (archive members, several pickles), so these bounds are shared by a file's streams too.
Past a bound the scan stops with SL203 at the stream that crossed it (fail closed: nothing after it
counts as read); what a report lists is bounded as well, so that a report, and an audit that holds
one per file, stays small whatever a file holds. Every import site is still judged.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from safeload.analysis.evaluate import ImportRows
from safeload.analysis.types import WalkResult
from safeload.analysis.walker import MAX_ANOMALIES, MAX_IMPORT_SITES
from safeload.errors import LimitExceededError
from safeload.formats.base import PickleStream
from safeload.limits import Limits
from safeload.model import Finding, GlobalUse, make_finding

# What one file's streams may record together. Each import site becomes a row of the report and
# each anomaly a finding (about 1 KB of memory apiece): a zip of a few KB can hold thousands of
# members of 200,000 sites or 1,000 anomalies each (the walker's bounds per stream), which took a GB
# of memory for every five such members.
MAX_IMPORT_SITES_PER_FILE = MAX_IMPORT_SITES
MAX_ANOMALIES_PER_FILE = 10 * MAX_ANOMALIES
# The walking one file may cost, in streams at the per-stream opcode bound (about 7 s each
# compiled): a zip of a few MB could otherwise hold a hundred such members within the
# decompression limits, 20 minutes of walking (hours without the compiled walker).
OPCODE_STREAMS_PER_FILE = 4
# What a report lists of a file's import sites: the first site of every global (at most
# MAX_LISTED_GLOBALS of them: past that the file is not scanned on) and other sites up to
# MAX_LISTED_SITES. Every site is judged; the bound keeps a report, and an audit that holds
# thousands of them, small: 200,000 rows took 250 MB (a 56 MB JSON report) for a 3 KB file.
MAX_LISTED_GLOBALS = 10_000
MAX_LISTED_SITES = 1_000
# Findings of one code a file keeps (about 1 KB apiece; SL101 with its remedy more), and one more
# of that code that counts the rest, so the verdict is the same: one per distinct global, per
# persistent id or per archive member would otherwise grow with what the file holds.
MAX_FINDINGS_PER_CODE = 1_000


class ScanBudget:
    """The import sites, anomalies and opcodes one scan may still take on."""

    def __init__(self, limits: Limits) -> None:
        self.sites = MAX_IMPORT_SITES_PER_FILE
        self.anomalies = MAX_ANOMALIES_PER_FILE
        self.opcodes_total = OPCODE_STREAMS_PER_FILE * limits.max_opcodes
        self.opcodes = self.opcodes_total
        self.listed_globals: set[str] = set()
        self.listed_sites = 0
        self.full = False  # past MAX_LISTED_GLOBALS: the streams after are not scanned
        self.findings: dict[str, int] = {}
        self.unlisted: dict[str, int] = {}

    def admit(self, code: str) -> bool:
        """Whether a finding of ``code`` is kept: False (and counted) past MAX_FINDINGS_PER_CODE
        of its code in this file. Asked before a finding is made, so none past it is built."""
        count = self.findings.get(code, 0)
        if count >= MAX_FINDINGS_PER_CODE:
            self.unlisted[code] = self.unlisted.get(code, 0) + 1
            return False
        self.findings[code] = count + 1
        return True

    def kept(self, findings: Sequence[Finding]) -> list[Finding]:
        """``findings`` less those past MAX_FINDINGS_PER_CODE of their code in this file."""
        return [finding for finding in findings if self.admit(finding.code)] if findings else []

    def summaries(self) -> list[Finding]:
        """One finding per code for the findings ``kept`` left out."""
        if not self.unlisted:
            return []
        return [
            make_finding(
                code,
                f"{count} more {code} findings in this file are not listed (a report lists "
                f"{MAX_FINDINGS_PER_CODE} of each code)"
                + (
                    "; its streams' globals show those globals as not allowed"
                    if code in ("SL100", "SL101")
                    else ""
                ),
            )
            for code, count in self.unlisted.items()
        ]

    def walk_bounds(self, limits: Limits) -> tuple[Limits, int]:
        """The limits and import-site bound to walk the next stream with: one past what the file
        may still take, so that a stream past the budget stops there and ``take`` refuses it (a
        hostile zip's second member of 199,000 sites, or fifth at the opcode bound, used to be
        walked to its end first)."""
        if self.full:
            return msgspec.structs.replace(limits, max_opcodes=1), 1  # take() refuses any stream now
        if self.opcodes < limits.max_opcodes:
            limits = msgspec.structs.replace(limits, max_opcodes=self.opcodes + 1)
        return limits, self.sites + 1

    def take(self, walked: WalkResult, stream: PickleStream) -> None:
        """Count a walked stream against the budget; LimitExceededError past it."""
        over = None
        if self.full:
            over = f"{MAX_LISTED_GLOBALS} distinct globals"
        elif len(walked.imports) > self.sites:
            over = f"{MAX_IMPORT_SITES_PER_FILE} imports"
        elif len(walked.anomalies) > self.anomalies:
            over = f"{MAX_ANOMALIES_PER_FILE} anomalies"
        elif walked.opcodes > self.opcodes:
            over = f"{self.opcodes_total} opcodes"
        if over is not None:
            # Fail closed on the whole file: this stream and the ones after it are not judged.
            raise LimitExceededError(
                f"more than {over} in this file's pickle streams together; this stream and any "
                "after it were not scanned",
                member=stream.member,
                offset=0,
                file_offset=stream.file_offset,
                remedy=f"extract the members and scan them on their own (up to {MAX_IMPORT_SITES} imports "
                f"and {MAX_ANOMALIES} anomalies a stream); no real checkpoint comes near this",
            )
        self.sites -= len(walked.imports)
        self.anomalies -= len(walked.anomalies)
        self.opcodes -= walked.opcodes

    def listed(
        self, imports: ImportRows, stream: PickleStream
    ) -> tuple[tuple[GlobalUse, ...], int, Finding | None]:
        """(the rows a report lists, how many sites it leaves out, an SL203 finding when this stream
        takes the file past MAX_LISTED_GLOBALS distinct globals: no stream after it is then
        scanned)."""
        names = self.listed_globals
        count = len(imports)
        if self.listed_sites + count <= MAX_LISTED_SITES and len(names) + count <= MAX_LISTED_GLOBALS:
            # Far from both bounds (every real file): each site is listed.
            names.update(imports.names)
            self.listed_sites += count
            return tuple(imports.rows()), 0, None
        kept: list[int] = []
        over: Finding | None = None
        for i, name in enumerate(imports.names):
            if name not in names:
                if len(names) >= MAX_LISTED_GLOBALS:
                    if over is None:
                        offset = imports.sites[i].offset
                        over = make_finding(
                            "SL203",
                            f"more than {MAX_LISTED_GLOBALS} distinct globals in this file; the rest are "
                            "not listed, and no stream after this one was scanned",
                            member=stream.member,
                            offset=offset,
                            file_offset=None if stream.file_offset is None else stream.file_offset + offset,
                            global_name=name,
                            remedy="no real checkpoint imports this many; extract the members and scan "
                            "them on their own",
                        )
                    continue
                names.add(name)
            elif self.listed_sites >= MAX_LISTED_SITES:
                continue
            kept.append(i)
            self.listed_sites += 1
        self.full = self.full or over is not None
        return tuple(imports.row(i) for i in kept), count - len(kept), over
