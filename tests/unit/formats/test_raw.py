"""Raw pickles: recognized by structure (every protocol), not by a magic byte or a file name."""

from __future__ import annotations

import pickle
import pickletools
from pathlib import Path

import pytest

from safeload.formats import Budget, ReadContext, StreamRole, raw
from safeload.limits import Limits
from tests import pickle_builder as pb

NESTED = {"a": [1, 2.5, "x", None, (1, 2), {"b": b"bytes", "c": {3, 4}}], "big": 10**30, "t": True, "neg": -7}


def sniff(data: bytes) -> bool:
    return raw.sniff(memoryview(data))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_protocol_is_recognized(protocol: int) -> None:
    assert sniff(pickle.dumps(NESTED, protocol=protocol))


@pytest.mark.parametrize("protocol", [0, 1])
def test_protocol_0_and_1_payloads_without_proto_header(protocol: int) -> None:
    # CVE-2025-10155: a protocol 0/1 pickle has no \x80 header; it must still be recognized.
    payload = pb.exec_payload(Path("PAYLOAD_RAN"), protocol=protocol)
    assert payload[:1] != b"\x80"
    assert sniff(payload)
    assert sniff(pb.system_payload(Path("PAYLOAD_RAN"), protocol=protocol))


def test_payload_before_a_broken_tail_is_recognized() -> None:
    # A GLOBAL reached before the bytes stop making sense: CPython would import before failing.
    assert sniff(b"cos\nsystem\n(S'true'\ntR\xff\xfe")


def test_a_global_whose_name_is_no_name_still_imports_its_module() -> None:
    assert sniff(b"cantigravity\n!no such name\n.")
    assert not sniff(b"cno module\n!no such name\n.")  # __import__ of no module name: nothing
    assert sniff(b"iantigravity\nx\n.")  # INST without MARK: pickle.py imports before it looks


@pytest.mark.parametrize("data", [b"cantigravity\n", b"iantigravity\n", b"N\x89cantigravity\nthi"])
def test_a_global_the_data_ends_inside_still_imports_for_pickle_py(data: bytes) -> None:
    """pickle.py's readline hands over what is left without a newline (and its [:-1] cuts a byte):
    joblib.load of such bytes asks for the module; the C unpickler stops first."""
    import io

    asked: list[str] = []

    class Recording(pickle._Unpickler):  # type: ignore[name-defined]
        def find_class(self, module: str, name: str) -> object:
            asked.append(module)
            raise pickle.UnpicklingError("recorded")

    with pytest.raises(pickle.UnpicklingError):
        Recording(io.BytesIO(data)).load()
    assert asked == ["antigravity"]
    assert sniff(data)


@pytest.mark.parametrize(
    "text",
    [
        b"cool model, trained for 3 epochs\n",
        b"(c) 2024 The Authors\n",
        b"[PAD]\n[unused0]\n[unused1]\n",
        b"import torch\nx = 1\n",
        b"def forward(self, x):\n    return x\n",
        b'{"architectures": ["Bert"]}',
        b"I,J,K\n1,2,3\n",
        b"Ntext that is not a pickle",
        b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
        b"",
        b"\x80\x09future protocol",
        b"PK\x03\x04\x14\x00zip/data.pklFB\n(dp0\nVa\np1\n",  # PERSID first: a plain unpickler stops
    ],
)
def test_text_and_other_formats_are_not_pickles(text: bytes) -> None:
    assert not sniff(text)


def test_scan_finds_each_pickle_boundary() -> None:
    parts = [pickle.dumps(NESTED, protocol=p) for p in range(6)]
    data = memoryview(b"".join(parts))
    pos = 0
    for part in parts:
        scan = raw.scan_pickle(data, pos)
        assert scan.error is None and scan.end == pos + len(part)
        pos = scan.end
    assert raw.scan_pickle(data, pos).end is None  # nothing left


def test_scan_agrees_with_pickletools_on_opcode_count() -> None:
    data = pickle.dumps(NESTED, protocol=2)
    assert raw.scan_pickle(memoryview(data)).ops == sum(1 for _ in pickletools.genops(data))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x80\x02X\xff\xff\x00\x00abc.", "truncated"),
        (b"\x80\x07N.", "protocol"),
        (b"\x80\x02N", "STOP"),
        (b"\x80\x02\xffN.", "opcode"),
        (b"\x80\x02T\xff\xff\xff\xffN.", "negative"),
    ],
)
def test_scan_reports_why_it_stopped(data: bytes, why: str) -> None:
    scan = raw.scan_pickle(memoryview(data))
    assert scan.end is None and scan.error is not None and why in scan.error


def test_huge_line_argument_is_bounded() -> None:
    data = memoryview(b"S'" + b"a" * (1 << 16))  # no newline for 64 KiB
    scan = raw.scan_pickle(data, line_limit=4096)
    assert scan.end is None and scan.error is not None and "newline" in scan.error


def test_read_is_the_whole_buffer() -> None:
    data = memoryview(pickle.dumps(NESTED, protocol=3) * 2)
    ctx = ReadContext(
        path="p", member="outer.tar!inner", file_offset=100, depth=1, limits=Limits(), budget=Budget(1)
    )
    result = raw.read(data, ctx)
    assert result.format == "pickle"
    [stream] = result.streams
    assert stream.data.obj is data.obj and len(stream.data) == len(data)  # zero-copy
    assert stream.member == "outer.tar!inner" and stream.file_offset == 100
    assert stream.role is StreamRole.RAW and stream.multi and stream.loadable
