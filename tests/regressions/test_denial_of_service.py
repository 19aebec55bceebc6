"""THREATS.md §5: hostile streams never make the scan blow up, crash or pass unread."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest

import safeload
from safeload.analysis.walker import walk
from safeload.api import analyse, resolve_policy
from safeload.limits import Limits
from safeload.model import Verdict
from safeload.source import from_bytes
from tests import pickle_builder as pb


def codes(data: bytes) -> tuple[Verdict, set[str]]:
    report = safeload.scan_bytes(data, policy="default")
    return report.verdict, {f.code for f in report.findings}


def billion_laughs(levels: int = 60, fan: int = 16) -> bytes:
    out = pb.proto(4) + pb.EMPTY_LIST + pb.MEMOIZE
    for level in range(levels):
        out += pb.MARK + (b"j" + struct.pack("<I", level)) * fan + b"l" + pb.MEMOIZE
    return out + pb.STOP


def test_memo_fan_out_stays_linear() -> None:
    data = billion_laughs()
    tracemalloc.start()
    try:
        verdict, found = codes(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert verdict is Verdict.SAFE and found == set()  # no globals: nothing to refuse
    assert peak < 32 << 20


def test_huge_integers_are_bounded() -> None:
    for data in [
        b"L" + b"7" * 1_000_000 + b"\n.",
        b"I" + b"7" * 1_000_000 + b"\n.",
        b"\x80\x02\x8b" + struct.pack("<i", 400_000) + b"\x01" * 400_000 + b".",
    ]:
        verdict, found = codes(data)
        assert verdict is Verdict.UNSCANNABLE and "SL203" in found


def test_deep_nesting_is_bounded() -> None:
    for data in [b"(" * 100_000 + b"N.", b"\x80\x02N" + b"\x85" * 100_000 + b"."]:
        verdict, found = codes(data)
        assert verdict is Verdict.UNSCANNABLE and "SL203" in found
    # Lists nested by APPEND need no MARK: the scan still finishes (CPython builds them iteratively).
    verdict, found = codes(b"]" * 50_000 + b"a" * 49_999 + b".")
    assert verdict is Verdict.SAFE and found == set()


def test_deep_tuple_key_cannot_crash_the_scanner() -> None:
    """Hashing a 200000-deep tuple segfaults CPython; the replay must never try it."""
    data = b"\x80\x02}N" + b"\x85" * 200_000 + b"\x88s."
    code = (
        "import sys, safeload\n"
        "from safeload.limits import Limits\n"
        "data = sys.stdin.buffer.read()\n"
        "print(safeload.scan_bytes(data).verdict.value)\n"
        "from safeload.analysis import walk, replay_imports\n"
        "w = walk(data, limits=Limits(max_nesting_depth=1_000_000))\n"
        "print(replay_imports(data, multi=True, walk=w).skipped is not None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=data, capture_output=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.split() == [b"UNSCANNABLE", b"True"]


def lying_frame_memo(index: int) -> bytes:
    """Read whole (pickle.loads), an OrderedDict. Through io.BytesIO the string that crosses the
    frame's end takes its bytes from after the frame, and what follows is a LONG_BINPUT of ``index``:
    the C unpickler allocates and zeroes a memo of twice that many pointers before anything fails."""
    body = b"\x8c\x05ab"  # SHORT_BINUNICODE of 5 bytes, 2 of them inside the frame
    put = b"r" + struct.pack("<I", index)
    after = b"cde" + b"C\x05" + put + b"00" + pb.stack_global("collections", "OrderedDict") + b")R."
    return b"\x80\x04" + pb.frame(body, len(body)) + after


def _python(code: str, data: bytes) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], input=data, capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-500:]
    return done.stdout.decode().splitlines()


def test_a_reading_behind_a_lying_frame_cannot_take_the_memory() -> None:
    """The walker bounds the memo along its own reading; behind a lying FRAME the other readers'
    readings were never walked. Their replays run in a child with bounded memory: the scan's own
    process stays small, and the report says that reading was not followed to its end."""
    data = lying_frame_memo(0x0800_0000)  # a 2 GiB memo
    assert isinstance(pickle.loads(data), collections.OrderedDict)
    # Live: through io.BytesIO the allocation really happens (capped here, so it fails instead).
    capped = (
        "import io, pickle, resource, sys\n"
        "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), resource.RLIM_INFINITY))\n"
        "try:\n    pickle.load(io.BytesIO(sys.stdin.buffer.read()))\n"
        "except MemoryError:\n    print('MemoryError')\n"
    )
    assert _python(capped, data) == ["MemoryError"]

    measure = (
        "import re, sys, safeload\n"
        "report = safeload.scan_bytes(sys.stdin.buffer.read())\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the process that forked this one.
        "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "print(report.verdict.value, peak)\n"
        "for f in report.findings: print(f.code, f.message)\n"
    )
    lines = _python(measure, data)
    verdict, peak_kib = lines[0].split()
    assert verdict == "UNSAFE" and int(peak_kib) < 400 * 1024
    stopped = [line for line in lines[1:] if line.startswith("SL203") and "bytesio" in line]
    assert stopped and "memory" in stopped[0]


def test_a_bytearray_too_large_for_the_replay_prints_nothing(tmp_path: Path) -> None:
    """Behind a lying FRAME, a BYTEARRAY8 of 1 GiB: the readers' replays run capped, the allocation
    fails there, and CPython 3.11's error path for it printed "SystemError: deallocated bytearray
    object has exported buffers" on the scan's stderr, which reads as if safeload had crashed."""
    body = b"\x96" + struct.pack("<Q", 0x3E00_0002) + b"ab" + pb.MEMOIZE + pb.STOP
    data = pb.proto(5) + pb.frame(body, len(body)) + pb.glob("builtins", "bytearray") + pb.put(0) + pb.STOP
    target = tmp_path / "huge_bytearray.pkl"
    target.write_bytes(data)
    for _ in range(3):  # what the error path reads is left over memory: it printed most times
        done = subprocess.run(
            [sys.executable, "-m", "safeload", "scan", str(target)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert done.returncode in (1, 2)
        assert "SL107" in done.stdout.decode()  # the lying frame, said in the report
        assert done.stderr == b"", done.stderr[-500:]


def _flagged_dict(size: int) -> bytes:
    """A stream fickling is slowest on for its size (about 10 us a byte): os.system, then a dict of
    one-byte items."""
    items = (b"K\x01K\x02s") * (size // 5)
    return b"\x80\x02cos\nsystem\n}" + items + b"0."


def test_decompiling_flagged_streams_is_bounded_per_scan() -> None:
    """The explanation is for a person; it must not make the scan of an archive full of flagged
    pickles cost seconds for each of them. Every stream is still scanned and named."""
    from safeload.explain import MAX_EXPLAIN_BYTES, MAX_EXPLAIN_TOTAL

    stream = _flagged_dict(200 << 10)
    assert len(stream) <= MAX_EXPLAIN_BYTES
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(12):
            zf.writestr(f"part{i}.pkl", stream)
    report = safeload.scan_bytes(buf.getvalue())
    assert report.verdict is Verdict.UNSAFE
    flagged = {f.member for f in report.findings if f.global_name == "os.system"}
    assert flagged == {f"part{i}.pkl" for i in range(12)}
    explained = [s for s in report.streams if s.explanation is not None]
    assert 1 <= len(explained) <= MAX_EXPLAIN_TOTAL // len(stream)

    # Many small ones: each is named, the first few explained.
    from safeload.explain import MAX_EXPLAINED_STREAMS

    small = _flagged_dict(100)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(MAX_EXPLAINED_STREAMS + 20):
            zf.writestr(f"part{i}.pkl", small)
    report = safeload.scan_bytes(buf.getvalue())
    named = {f.member for f in report.findings if f.global_name == "os.system"}
    assert len(named) == MAX_EXPLAINED_STREAMS + 20
    assert sum(s.explanation is not None for s in report.streams) == MAX_EXPLAINED_STREAMS

    # One stream over the per-stream bound is named, not decompiled.
    alone = safeload.scan_bytes(_flagged_dict(MAX_EXPLAIN_BYTES + 10))
    assert alone.verdict is Verdict.UNSAFE and alone.streams[0].explanation is None
    assert any(f.global_name == "os.system" for f in alone.findings)


def test_colliding_hash_keys_are_not_replayed() -> None:
    modulus = (1 << 61) - 1
    item = b"".join(
        b"\x8a\x0a" + (k * modulus).to_bytes(10, "little", signed=True) + b"N" for k in range(1, 5000)
    )
    data = b"\x80\x02}(" + item + b"u."
    verdict, found = codes(data)
    assert verdict is Verdict.UNSCANNABLE and "SL203" in found


def test_huge_memo_index_is_refused() -> None:
    verdict, found = codes(b"\x80\x02Nr\xff\xff\xff\xff.")
    assert verdict is Verdict.UNSCANNABLE and "SL203" in found


def test_what_follows_a_huge_memo_index_is_still_judged(marker: Path) -> None:
    """CPython grows its memo list to a LONG_BINPUT's index and reads on: the walk used to stop
    there (UNSCANNABLE, the payload after it unnamed); it notes the index and reads on."""
    payload = pb.system_payload(marker)
    data = pb.proto(2) + pb.NONE + b"r\xff\xff\xff\x7f" + pb.POP + payload[2:]
    report = safeload.scan_bytes(data, policy="default")
    assert report.verdict is Verdict.UNSAFE
    assert {f.code for f in report.findings} >= {"SL203", "SL100"}
    assert "os.system" in {f.global_name for f in report.findings}
    # Bytes that start like no pickle and store at such an index with no lookup before it are no
    # inert text: a loader would grow its memo to 2 GB entries. They stay reported.
    report = safeload.scan_bytes(b"Nr\x00\x00\x00\x10a", policy="default")
    assert [f.code for f in report.findings] == ["SL203", "SL200"]
    assert not marker.exists()


def test_huge_declared_lengths_allocate_nothing() -> None:
    for op in (b"\x8e", b"\x96", b"\x8d", b"\x95"):
        data = b"\x80\x05" + op + struct.pack("<Q", 1 << 62) + b"x."
        tracemalloc.start()
        try:
            verdict, found = codes(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert verdict is not Verdict.SAFE and "SL200" in found
        assert peak < 16 << 20


def test_many_tiny_opcodes_hit_the_opcode_limit() -> None:
    data = pb.exec_payload(Path("/nonexistent/marker"), 2)[:-1] + b"N0" * 100_000 + b"N."
    result = walk(data, limits=Limits(max_opcodes=10_000))
    assert "SL203" in {a.code for a in result.anomalies}
    assert [i.qualname for i in result.imports] == ["builtins.exec"]


class _CountedPath(str):
    """A path that counts how often it is compared: the work of grouping a walk, without a clock."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedPath.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_a_file_linked_from_everywhere_groups_in_linear_work(tmp_path: Path) -> None:
    """A registry may link one blob from any number of places (a snapshot each, or a hostile tree
    of 100,000 links). Grouping the walk tested each new path against a list of the group's
    paths: 40,000 links to one file took 15 s, and the work grew with their square."""
    from safeload import audit_walk

    blob = tmp_path / "blob.pkl"
    blob.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    st = blob.stat()
    count = 20_000
    entries = [(str(blob), False, False, st, None)]
    entries += [(_CountedPath(f"{tmp_path}/l{i:06d}"), False, True, st, None) for i in range(count)]
    _CountedPath.compared = 0
    (group,) = audit_walk.group(entries)
    assert len(group.paths) == count + 1 and len(group.links) == count
    assert len(group.reported_paths()) == count  # the links stand for the blob
    # Set lookups compare a path with an equal-hashed one at most now and then; a list's
    # membership test compares it with every path before it (200 million comparisons here).
    assert _CountedPath.compared < 10 * count


def _many_sites(count: int) -> bytes:
    """One allowed global, looked up ``count`` times (STACK_GLOBAL over two memoized strings: 6
    bytes a site, which deflate shrinks to almost nothing)."""
    head = pb.proto(4) + b"\x8c\x0bcollections\x94" + b"\x8c\x0bOrderedDict\x94"
    return head + (b"h\x00h\x01\x93" + pb.POP) * count + pb.NONE + pb.STOP


def _zip_of(members: list[bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, data in enumerate(members):
            z.writestr(f"m{i}.pkl", data)
    return buf.getvalue()


def test_import_sites_are_bounded_per_file_not_only_per_stream(
    monkeypatch: pytest.MonkeyPatch, marker: Path
) -> None:
    """Each import site is a row of the report (about 1 KB of memory). The walker stops a stream
    at 200,000 of them, but a 9 KB zip held five such members: 1.7 GB and 10 s, and a few
    thousand members would exhaust any machine. One file's streams now share the bound: past it,
    the scan stops with SL203 at the member that crossed it, and nothing after it counts as read
    (a payload there leaves the file UNSCANNABLE, never SAFE)."""
    from safeload.analysis import budget

    monkeypatch.setattr(budget, "MAX_IMPORT_SITES_PER_FILE", 1000)
    fits = _zip_of([_many_sites(300)] * 3)
    report = safeload.scan_bytes(fits, policy="default")
    assert report.verdict is Verdict.SAFE, [f.message for f in report.findings]
    assert sum(len(s.globals) for s in report.streams) == 900

    hostile = _zip_of([_many_sites(400)] * 3 + [pb.system_payload(marker)])
    report = safeload.scan_bytes(hostile, policy="default")
    assert report.verdict is Verdict.UNSCANNABLE
    (limit,) = [f for f in report.findings if f.code == "SL203"]
    assert limit.member == "m2.pkl" and "more than 1000 imports" in limit.message
    assert limit.remedy  # (a deflated member has no offset in the file)
    assert [s.member for s in report.streams] == ["m0.pkl", "m1.pkl"]
    assert not marker.exists()


def test_a_stream_past_the_file_budget_is_not_walked_to_its_end(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The stream that takes a file past its import-site or opcode budget is refused; it used to be
    walked to its end first (a hostile zip's second member of 199,000 sites: half the scan)."""
    from safeload import api
    from safeload.analysis import budget

    walked: list[tuple[int, int]] = []
    real_walk = api.walk

    def recorded(*args: object, **kwargs: object) -> object:
        result = real_walk(*args, **kwargs)  # type: ignore[arg-type]
        walked.append((len(result.imports), result.opcodes))
        return result

    monkeypatch.setattr(api, "walk", recorded)
    monkeypatch.setattr(budget, "MAX_IMPORT_SITES_PER_FILE", 1000)
    report = safeload.scan_bytes(_zip_of([_many_sites(700), _many_sites(5000)]), policy="default")
    assert [f.code for f in report.findings] == ["SL203"] and report.findings[0].member == "m1.pkl"
    assert [sites for sites, _ in walked] == [700, 301]

    walked.clear()
    policy = tmp_path / "p.toml"
    policy.write_text('schema_version = 1\nextends = ["default"]\n[limits]\nmax_opcodes = 10000\n')
    opcodes = pb.proto(4) + (pb.EMPTY_TUPLE + pb.POP) * 4_000 + pb.NONE + pb.STOP  # 8,003 opcodes
    report = safeload.scan_bytes(_zip_of([opcodes] * 6), policy=str(policy))
    assert [f.member for f in report.findings if f.code == "SL203"] == ["m4.pkl"]
    # four streams' worth is 40,000: the fifth stops one opcode past what is left
    assert [ops for _, ops in walked] == [8003] * 4 + [40_000 - 4 * 8003 + 1]


def test_the_default_bound_on_import_sites_per_file() -> None:
    """At the real bound: five members of 90,000 sites (a 3 KB zip) stop at the third."""
    data = _zip_of([_many_sites(90_000)] * 5)
    assert len(data) < 10_000
    report = safeload.scan_bytes(data, policy="default")
    assert report.verdict is Verdict.UNSCANNABLE
    assert [(f.code, f.member) for f in report.findings] == [("SL203", "m2.pkl")]
    listed = sum(len(s.globals) for s in report.streams)
    assert listed == 1_000 and listed + sum(s.globals_omitted for s in report.streams) == 180_000


def _dunder_builds(count: int) -> bytes:
    """``count`` BUILDs that set ``__x__`` on an argparse.Namespace: an SL104 anomaly each."""
    head = pb.proto(2) + pb.glob("argparse", "Namespace") + pb.MEMOIZE
    build = b"h\x00)\x81}" + b"X\x05\x00\x00\x00__x__K\x01sb" + pb.POP
    return head + build * count + pb.NONE + pb.STOP


def test_anomalies_past_the_walker_bound_are_said_to_be_missing() -> None:
    report = safeload.scan_bytes(_dunder_builds(1100), policy="default")
    assert report.verdict is Verdict.UNSAFE
    assert [f.message for f in report.findings if f.code == "SL203"] == [
        "100 further anomalies were not recorded"
    ]
    assert sum(f.code == "SL104" for f in report.findings) == 1000


def test_anomalies_are_bounded_per_file_not_only_per_stream() -> None:
    """Each anomaly is a finding (about 1 KB). A 21 KB zip of 100 members of 1,000 anomalies each
    made 100,000 findings (270 MB, a 39 MB JSON report); max_streams lets a file hold 10,000 such
    streams. One file's streams now share a bound of 10,000."""
    data = _zip_of([_dunder_builds(1000)] * 15)
    report = safeload.scan_bytes(data, policy="default")
    assert report.verdict is Verdict.UNSAFE
    (limit,) = [f for f in report.findings if f.code == "SL203"]
    assert limit.member == "m10.pkl" and "more than 10000 anomalies" in limit.message
    # 10,000 SL104 were recorded; a report lists 1,000 of a code and one more that counts the rest
    dunder = [f for f in report.findings if f.code == "SL104"]
    assert len(dunder) == 1001 and dunder[-1].message.startswith("9000 more SL104 findings")
    assert len(report.findings) == 1001 + 1


def test_walking_is_bounded_per_file_not_only_per_stream(tmp_path: Path) -> None:
    """A stream may take up to max_opcodes (50 million: about 7 s compiled), and a zip of a few MB
    could hold a hundred such members within the decompression limits. One file's streams now
    share four streams' worth; here with max_opcodes 10,000 (a policy's limits), so 40,000."""
    policy = tmp_path / "p.toml"
    policy.write_text('schema_version = 1\nextends = ["default"]\n[limits]\nmax_opcodes = 10000\n')
    stream = pb.proto(4) + (pb.EMPTY_TUPLE + pb.POP) * 4_000 + pb.NONE + pb.STOP  # 8,003 opcodes
    fits = safeload.scan_bytes(_zip_of([stream] * 4), policy=str(policy))
    assert fits.verdict is Verdict.SAFE, [f.message for f in fits.findings]
    report = safeload.scan_bytes(_zip_of([stream] * 8), policy=str(policy))
    assert report.verdict is Verdict.UNSCANNABLE
    (limit,) = [f for f in report.findings if f.code == "SL203"]
    assert limit.member == "m4.pkl" and "more than 40000 opcodes" in limit.message
    assert len(report.streams) == 4


def test_a_report_lists_every_global_and_a_bounded_number_of_sites() -> None:
    """200,000 sites listed one row each took 250 MB and a 56 MB JSON report for a 3 KB file, and
    an audit holds every report until it writes its own. A report now lists the first site of
    every global and further sites up to 1,000 in all, and counts the rest; all are judged."""
    allowed = _many_sites(50_000)
    flagged = pb.proto(4) + pb.glob("os", "system") + pb.POP + pb.NONE + pb.STOP
    report = safeload.scan_bytes(_zip_of([allowed, flagged]), policy="default")
    first, second = report.streams
    assert len(first.globals) == 1_000 and first.globals_omitted == 49_000
    # the other member's global is listed though the file's sites are past the bound
    assert [g.name for g in second.globals] == ["os.system"] and second.globals_omitted == 0
    assert report.globals == ["collections.OrderedDict", "os.system"]
    assert report.verdict is Verdict.UNSAFE
    assert len(safeload.model.dump_json(report)) < 400_000


def test_more_distinct_globals_than_a_report_lists_stop_the_scan() -> None:
    names = [(f"m{i}", f"n{i}") for i in range(10_001)]
    body = b"".join(pb.glob(module, name) + pb.POP for module, name in names)
    report = safeload.scan_bytes(pb.proto(2) + body + pb.NONE + pb.STOP, policy="default")
    assert report.verdict is Verdict.UNSAFE  # its globals are not allowed, and it is cut short
    (limit,) = [f for f in report.findings if f.code == "SL203"]
    assert "more than 10000 distinct globals" in limit.message and limit.global_name == "m10000.n10000"
    assert limit.offset is not None
    assert len(report.streams) == 1 and len(report.streams[0].globals) == 10_000
    # One finding per global and its remedy (about 1 KB each): 1,000 of them, and one that counts
    # the rest (50,000 distinct globals made a 60 MB report).
    named = [f for f in report.findings if f.code == "SL101"]
    assert len(named) == 1001 and named[-1].message.startswith("9001 more SL101 findings")
    assert len(safeload.model.dump_json(report)) < 4_000_000
    # Nothing after that stream is scanned: a member after it is not judged SAFE.
    many = pb.proto(2) + body + pb.NONE + pb.STOP
    report = safeload.scan_bytes(_zip_of([many, pb.proto(2) + pb.NONE + pb.STOP]), policy="strict")
    assert [f.member for f in report.findings if f.code == "SL203"] == ["m0.pkl", "m1.pkl"]
    assert [s.member for s in report.streams] == ["m0.pkl"]


def test_findings_of_one_code_are_bounded_per_file() -> None:
    """Findings per stream are bounded (50 of a kind and one more, for persistent ids), but a file
    may hold 10,000 streams. A report keeps 1,000 of each code and one that counts the rest."""
    persid = pb.proto(0) + b"".join(b"P%d\n0" % i for i in range(60)) + pb.NONE + pb.STOP
    report = safeload.scan_bytes(_zip_of([persid] * 30), policy="default")
    assert report.verdict is Verdict.UNSAFE
    listed = [f for f in report.findings if f.code == "SL106"]
    assert len(listed) == 1001 and listed[-1].message.startswith("530 more SL106 findings")


def test_sites_a_report_leaves_out_are_judged_but_not_modelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A report row is a pydantic model; one per site took a quarter of a hostile stream's scan
    time and half its memory (200,000 sites: 2.2 s, 370 MB). Rows are built for listed sites only,
    while the loader still gets every name the stream imports."""
    from safeload.analysis import evaluate
    from safeload.model import GlobalUse

    built = collections.Counter[str]()

    def counted(**fields: object) -> GlobalUse:
        built[str(fields["name"])] += 1
        return GlobalUse(**fields)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluate, "GlobalUse", counted)
    flagged = pb.proto(4) + pb.glob("os", "system") + pb.POP + pb.NONE + pb.STOP
    analysis = analyse(
        from_bytes(_zip_of([_many_sites(20_000), flagged]), "two.zip"), resolve_policy("default")
    )
    assert analysis.report.verdict is Verdict.UNSAFE
    assert built == {"collections.OrderedDict": 1_000, "os.system": 1}
    assert [sa.names for sa in analysis.streams] == [{"collections.OrderedDict": 34}, {"os.system": 2}]


def test_findings_past_the_bound_are_never_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """50,000 distinct disallowed globals made 50,000 findings with their policy remedies before
    the report kept 1,000 of them: most of that scan's 2.4 s. Past the bound they are counted."""
    from safeload.policy import Policy

    remedies = collections.Counter[str]()
    remedy = Policy.remedy

    def counted(self: Policy, qualname: str) -> str:
        remedies[qualname] += 1
        return remedy(self, qualname)

    monkeypatch.setattr(Policy, "remedy", counted)
    body = b"".join(pb.glob(f"m{i}", "n") + pb.POP for i in range(3_000))
    report = safeload.scan_bytes(pb.proto(2) + body + pb.NONE + pb.STOP, policy="default")
    named = [f for f in report.findings if f.code == "SL101"]
    assert len(named) == 1_001 and named[-1].message.startswith("2000 more SL101 findings")
    assert len(remedies) == 1_000 and set(remedies.values()) == {1}
