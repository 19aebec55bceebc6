"""joblib: real joblib.dump output (every protocol and compression), malicious twins, sniff bounds."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest

from safeload.formats import compressed, joblib_fmt
from safeload.formats.base import StreamRole
from tests.pickle_builder import call, glob, unicode
from tests.unit.formats._samples import codes, foreign_samples, make_ctx

WEIGHTS = np.arange(64, dtype=np.float64).reshape(8, 8)
PLACEHOLDER = "PLACEHOLDER-" + "x" * 20


def dump(tmp_path: Path, obj: object, **kw: object) -> bytes:
    path = tmp_path / "model.joblib"
    joblib.dump(obj, path, **kw)  # type: ignore[arg-type]
    return path.read_bytes()


def malicious_joblib(tmp_path: Path, marker: Path) -> tuple[bytes, bytes]:
    """A real joblib file whose string after the array bytes is replaced by exec(...)."""
    data = dump(tmp_path, {"w": WEIGHTS, "z": PLACEHOLDER}, protocol=2)
    literal = b"X" + struct.pack("<I", len(PLACEHOLDER)) + PLACEHOLDER.encode()
    assert data.count(literal) == 1
    payload = call(glob("builtins", "exec"), unicode(f"open({str(marker)!r}, 'w').close()"))
    return data.replace(literal, payload), payload


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_protocol_is_claimed(protocol: int, tmp_path: Path) -> None:
    data = dump(tmp_path, {"w": WEIGHTS, "meta": {"lr": 0.1}}, protocol=protocol)
    buf = memoryview(data)
    assert joblib_fmt.sniff(buf)
    result = joblib_fmt.read(buf, make_ctx(file_offset=0))
    assert result.format == "joblib"
    assert codes(result) == []
    stream, plain = result.streams
    assert stream.role is StreamRole.JOBLIB
    assert stream.joblib_arrays is True and stream.multi is False and stream.loadable is True
    assert stream.data.obj is buf.obj and stream.data.nbytes == len(data)
    assert stream.file_offset == 0
    # What pickle.load would read of the same bytes, judged too (see test_polyglot_...)
    assert plain.secondary and plain.role is StreamRole.RAW and not plain.loadable
    assert not plain.joblib_arrays and plain.data.obj is buf.obj
    site = result.meta["joblib"]
    assert data[site["wrapper_offset"] :].startswith(
        (b"c", b"i", b"\x93")  # GLOBAL, INST or STACK_GLOBAL
    )
    assert site["protocol"] == (protocol if protocol >= 2 else None)


@pytest.mark.parametrize("compress", ["zlib", "gzip", "bz2", "lzma", "xz", "lz4"])
def test_every_compression_is_claimed_after_unwrapping(compress: str, tmp_path: Path) -> None:
    data = dump(tmp_path, {"w": WEIGHTS}, compress=compress)
    assert not joblib_fmt.sniff(memoryview(data))
    outer = compressed.read(memoryview(data), make_ctx())
    child = outer.children[0]
    assert joblib_fmt.sniff(child.data)
    result = joblib_fmt.read(
        child.data, make_ctx(member=child.name, file_offset=None, encoding=child.encoding)
    )
    stream, plain = result.streams
    assert stream.encoding == plain.encoding == (compress,)
    assert stream.file_offset is None
    assert result.meta["joblib"]["compression"] == compress


@pytest.mark.parametrize(
    "obj",
    [
        {"plain": [1, 2, 3]},  # joblib.dump without arrays writes a plain pickle
        ["joblib.numpy_pickle", "NumpyArrayWrapper"],  # the names as data, never imported
        {"NumpyArrayWrapper": b"joblib.numpy_pickle"},
    ],
)
def test_plain_pickles_are_not_claimed(obj: object, tmp_path: Path) -> None:
    assert not joblib_fmt.sniff(memoryview(dump(tmp_path, obj)))
    for protocol in range(6):
        assert not joblib_fmt.sniff(memoryview(pickle.dumps(obj, protocol=protocol)))


def test_numpy_array_pickled_by_pickle_is_not_joblib() -> None:
    assert not joblib_fmt.sniff(memoryview(pickle.dumps(WEIGHTS, protocol=4)))


@pytest.mark.parametrize("name", sorted(foreign_samples()))
def test_sniff_does_not_claim_other_formats(name: str) -> None:
    assert not joblib_fmt.sniff(memoryview(foreign_samples()[name]))


def test_wrapper_name_reached_through_the_memo(tmp_path: Path) -> None:
    # Two arrays: the second wrapper import comes from the memo; the first is still a literal.
    data = dump(tmp_path, [WEIGHTS, WEIGHTS + 1], protocol=4)
    assert data.count(b"NumpyArrayWrapper") == 1
    assert joblib_fmt.sniff(memoryview(data))


def test_sniff_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = dump(tmp_path, {"first": "y" * 5000, "w": WEIGHTS}, protocol=4)
    assert joblib_fmt.sniff(memoryview(data))
    monkeypatch.setattr(joblib_fmt, "SNIFF_WINDOW", 1024)
    assert not joblib_fmt.sniff(memoryview(data))
    monkeypatch.undo()
    monkeypatch.setattr(joblib_fmt, "SNIFF_OPCODES", 3)
    assert not joblib_fmt.sniff(memoryview(data))


def test_payload_after_array_bytes_is_in_the_stream(tmp_path: Path, marker: Path) -> None:
    data, payload = malicious_joblib(tmp_path, marker)
    assert joblib_fmt.sniff(memoryview(data))
    result = joblib_fmt.read(memoryview(data), make_ctx())
    stream = result.streams[0]
    at = bytes(stream.data).find(payload)
    # The payload sits after the raw array bytes, which a plain opcode walk cannot get past.
    assert at > bytes(stream.data).find(WEIGHTS.tobytes()) > result.meta["joblib"]["wrapper_offset"]
    assert stream.joblib_arrays is True


def test_compressed_malicious_joblib(tmp_path: Path, marker: Path) -> None:
    data, payload = malicious_joblib(tmp_path, marker)
    outer = compressed.read(memoryview(gzip.compress(data)), make_ctx())
    child = outer.children[0]
    result = joblib_fmt.read(child.data, make_ctx(encoding=child.encoding, file_offset=None))
    assert payload in bytes(result.streams[0].data)
    assert result.streams[0].encoding == ("gzip",)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["none", "gzip"])
def test_the_malicious_joblib_is_live_for_joblib(wrap: str, tmp_path: Path) -> None:
    live = tmp_path / "joblib_ran_it"
    data, _ = malicious_joblib(tmp_path, live)
    path = tmp_path / "evil.joblib"
    path.write_bytes(gzip.compress(data) if wrap == "gzip" else data)
    assert not live.exists()
    code = "import sys, joblib; joblib.load(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, timeout=120, capture_output=True)
    assert live.exists(), "fixture is not what joblib.load runs: the test would prove nothing"


def test_truncations_and_flips_never_raise(tmp_path: Path) -> None:
    data = dump(tmp_path, {"w": WEIGHTS, "o": np.array([{"k": 1}], dtype=object)}, protocol=4)
    for cut in range(0, len(data), 13):
        buf = memoryview(data[:cut])
        if joblib_fmt.sniff(buf):
            joblib_fmt.read(buf, make_ctx())
    rng = random.Random(9)
    for _ in range(300):
        flipped = bytearray(data)
        flipped[rng.randrange(200)] = rng.randrange(256)
        buf = memoryview(bytes(flipped))
        if joblib_fmt.sniff(buf):
            assert joblib_fmt.read(buf, make_ctx()).streams


def polyglot_joblib(tmp_path: Path, marker: Path) -> bytes:
    """A joblib file harmless to joblib.load whose array bytes are a payload for pickle.load.

    The wrapper's alignment is set to None, so joblib reads no padding and the array's bytes follow
    its BUILD directly; they are opcodes that call exec and pop the result. joblib.load skips them
    as the array's data; pickle.load runs them and reads on.
    """
    code = call(glob("builtins", "exec"), unicode(f"open({str(marker)!r}, 'w').close()")) + b"0"
    array = np.frombuffer(code, dtype=np.uint8)
    data = dump(tmp_path, {"w": array}, protocol=2)
    alignment = b"numpy_array_alignment_bytes"
    at = data.index(alignment) + len(alignment)
    if data[at : at + 1] == b"q":  # BINPUT of the key
        at += 2
    assert data[at : at + 2] == b"K\x10"  # BININT1 16
    data = data[:at] + b"N" + data[at + 2 :]
    build = data.index(b"b", at)  # the wrapper's BUILD; then the padding length, padding, the array
    pad = data[build + 1]
    assert data[build + 2 : build + 2 + pad] == b"\xff" * pad
    data = data[: build + 1] + data[build + 2 + pad :]
    assert data[build + 1 : build + 1 + len(code)] == code
    return data


def test_array_bytes_that_are_a_payload_for_pickle_load(tmp_path: Path, marker: Path) -> None:
    import safeload

    data = polyglot_joblib(tmp_path, marker)
    report = safeload.scan_bytes(data)
    assert report.verdict is safeload.Verdict.UNSAFE
    assert "builtins.exec" in {f.global_name for f in report.findings}
    # The joblib reading itself is clean: only the plain one imports exec.
    joblib_view = [g.name for s in report.streams[:1] for g in s.globals]
    assert "builtins.exec" not in joblib_view
    assert not marker.exists()


@pytest.mark.slow
def test_the_polyglot_joblib_is_live_for_pickle_load_only(tmp_path: Path) -> None:
    live = tmp_path / "pickle_ran_it"
    path = tmp_path / "model.joblib"
    path.write_bytes(polyglot_joblib(tmp_path, live))
    joblib_load = "import sys, joblib; v = joblib.load(sys.argv[1]); assert list(v) == ['w'], v"
    done = subprocess.run([sys.executable, "-c", joblib_load, str(path)], timeout=120, capture_output=True)
    assert done.returncode == 0 and not live.exists(), done.stderr
    pickle_load = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run([sys.executable, "-c", pickle_load, str(path)], timeout=120, capture_output=True)
    assert live.exists(), "fixture is not what pickle.load runs: the test would prove nothing"
