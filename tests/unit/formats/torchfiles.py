"""Real torch files for the format tests, and byte-level rewrites of them (the zip tricks).

Payloads here only create ``PAYLOAD_RAN`` in the current directory of whoever runs them: the tests
scan from a directory whose marker must never appear, and prove a trick is live by letting
``torch.load`` run it in a subprocess with its own working directory.
"""

from __future__ import annotations

import builtins
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.pickle_builder import marker_code

MARKER_NAME = "PAYLOAD_RAN"
PAYLOAD_TEXT = MARKER_NAME.encode()  # appears in the pickle bytes of every payload


class Payload:
    """Pickles as ``exec("open('PAYLOAD_RAN','w').close()")`` (a relative path: the loader's cwd)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (marker_code(Path(MARKER_NAME)),))


def save_checkpoint(path: Path, *, payload: bool = False, legacy: bool = False) -> bytes:
    """A real torch.save file: several dtypes, nested dicts, a parameter, two tensors sharing storage."""
    base = torch.arange(12, dtype=torch.float32)
    obj: dict[str, object] = {
        "weights": {"w": base.view(3, 4), "w_view": base[2:6], "b": torch.ones(3, dtype=torch.int16)},
        "extra": {"ids": torch.tensor([1, 2, 3], dtype=torch.int64), "flags": torch.tensor([True, False])},
        "param": torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)),
        "half": torch.full((4,), 0.5, dtype=torch.bfloat16),
        "step": 7,
    }
    if payload:
        obj["config"] = Payload()
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


def run_torch_load(path: Path, workdir: Path) -> tuple[bool, str]:
    """torch.load(path, weights_only=False) in a subprocess run in workdir: (payload ran, stderr)."""
    workdir.mkdir(parents=True, exist_ok=True)
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=workdir, capture_output=True, text=True, timeout=300
    )
    return (workdir / MARKER_NAME).exists(), proc.stderr


# -- reading and patching zip bytes (independent of the code under test) --------------------------


@dataclass
class Central:
    offset: int  # of the central directory record
    name: bytes
    header_offset: int
    flags: int


def central_records(data: bytes) -> list[Central]:
    eocd = data.rfind(b"PK\x05\x06")
    total = struct.unpack_from("<H", data, eocd + 10)[0]
    pos = struct.unpack_from("<I", data, eocd + 16)[0]
    out = []
    for _ in range(total):
        assert data[pos : pos + 4] == b"PK\x01\x02"
        flags = struct.unpack_from("<H", data, pos + 8)[0]
        nlen, xlen, clen = struct.unpack_from("<HHH", data, pos + 28)
        hoff = struct.unpack_from("<I", data, pos + 42)[0]
        out.append(Central(pos, data[pos + 46 : pos + 46 + nlen], hoff, flags))
        pos += 46 + nlen + xlen + clen
    return out


def record(data: bytes, suffix: bytes) -> Central:
    return next(c for c in central_records(data) if c.name.endswith(suffix))


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def shift_offsets(data: bytes, n: int) -> bytes:
    """Add n to every absolute offset (central records, EOCD, ZIP64 records): for n bytes put in front."""
    out = bytearray(data)
    for c in central_records(data):
        struct.pack_into("<I", out, c.offset + 42, c.header_offset + n)
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", out, eocd + 16, struct.unpack_from("<I", data, eocd + 16)[0] + n)
    loc = eocd - 20
    if data[loc : loc + 4] == b"PK\x06\x07":
        z64 = struct.unpack_from("<Q", data, loc + 8)[0]
        struct.pack_into("<Q", out, loc + 8, z64 + n)
        struct.pack_into("<Q", out, z64 + 48, struct.unpack_from("<Q", data, z64 + 48)[0] + n)
    return bytes(out)


@dataclass
class Member:
    name: bytes
    data: bytes
    flags: int = 0x0800
    local_flags: int | None = None
    local_name: bytes | None = None


def write_zip(members: list[Member]) -> bytes:
    """A stored zip written field by field, so tests can make it say what real writers never do."""
    body = bytearray()
    central = bytearray()
    for m in members:
        crc = zlib.crc32(m.data)
        lname = m.name if m.local_name is None else m.local_name
        lflags = m.flags if m.local_flags is None else m.local_flags
        offset = len(body)
        body += struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, lflags, 0, 0, 0, crc, len(m.data), len(m.data), len(lname), 0
        )
        body += lname + m.data
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            20,
            20,
            m.flags,
            0,
            0,
            0,
            crc,
            len(m.data),
            len(m.data),
            len(m.name),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += m.name
    eocd = struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(body), 0
    )
    return bytes(body + central + eocd)


def members_of(data: bytes) -> list[Member]:
    """A benign archive's members in order, read with Python's zipfile."""
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [Member(i.filename.encode(), zf.read(i)) for i in zf.infolist()]


# -- the legacy tar format (torch < 0.1.10), as torch's _legacy_load tar branch reads it -----------


def _dump(obj: object) -> bytes:
    import pickle

    return pickle.dumps(obj, protocol=2)


def legacy_tar(*, payload_in: str | None = None) -> bytes:
    """A legacy tar holding one float tensor [0, 1, 2, 3] under the key "t".

    ``payload_in`` names a member ("storages", "tensors", "pickle", "sys_info") whose first pickle
    is replaced by a harmless payload pickle (with the value torch expects still following it where
    the structure needs one).
    """
    import io
    import pickle
    import tarfile

    values = struct.pack("<4f", 0.0, 1.0, 2.0, 3.0)
    storages = _dump(1) + _dump((1, "cpu", torch.FloatStorage)) + struct.pack("<q", 4) + values + _dump([])
    tensors = _dump(1) + _dump((2, 1, torch.FloatTensor)) + struct.pack("<iI", 1, 0)
    tensors += struct.pack("<q", 4) + struct.pack("<q", 1) + struct.pack("<q", 0)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> str | None:
            return "2" if obj is _TENSOR else None

    _TENSOR = object()
    body = io.BytesIO()
    _Pickler(body, protocol=2).dump({"t": _TENSOR})
    members = {
        "sys_info": _dump({"protocol_version": 1001}),
        "pickle": body.getvalue(),
        "storages": storages,
        "tensors": tensors,
    }
    if payload_in is not None:
        evil = _dump(Payload())
        if payload_in == "storages":
            # The count pickle becomes (payload, 1)[1]: still the count torch needs after running it.
            members["storages"] = evil[:-1] + b"0" + storages
        else:
            members[payload_in] = evil
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()
