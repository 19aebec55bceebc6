"""A scan result built by hand, so the loader can be tested apart from the walker and readers.

Containers come from real files opened with zipfile here; globals from pickletools (it decodes
opcodes, never runs them). Only the attributes the loader reads are filled in.
"""

from __future__ import annotations

import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

from safeload.analysis import names
from safeload.formats.base import Container, PersistentScheme, PickleStream, StorageEntry, StreamRole
from safeload.policy import Policy, load_policy


@dataclass
class Report:
    path: str
    findings: tuple[Any, ...] = ()


@dataclass
class Source:
    buffer: memoryview


@dataclass
class Stream:
    stream: PickleStream
    names: dict[str, int | None]  # qualified name -> first offset, as the scan gives the loader


@dataclass
class Analysis:
    report: Report
    source: Source
    container: Container
    policy: Policy
    streams: list[Stream] = field(default_factory=list)


def pickle_globals(data: bytes | memoryview) -> dict[str, int | None]:
    """Every GLOBAL / STACK_GLOBAL of the first pickle, named as the scan reports them, with the
    offset of its first site."""
    out: dict[str, int | None] = {}
    proto = 0
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    for op, arg, pos in pickletools.genops(bytes(data)):
        if op.name == "PROTO":
            proto = arg
        if op.name in ("GLOBAL", "INST"):
            module, name = names.map_name(*arg.split(" ", 1), proto)
            out.setdefault(f"{module}.{name}", pos)
        elif op.name == "STACK_GLOBAL":
            module, name = strings[-2], strings[-1]
            out.setdefault(f"{module}.{name}", pos)
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(arg))
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = strings[-1] if strings else None
        elif op.name not in ("FRAME", "PROTO"):
            strings.append(None)
    return out


def _member_slice(buf: memoryview, info: zipfile.ZipInfo) -> tuple[memoryview, int]:
    assert info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = struct.unpack_from("<HH", buf, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    return buf[start : start + info.file_size], start


def torch_zip(
    data: bytes | bytearray | memoryview, policy: str | Policy = "strict", path: str = "<test>"
) -> Analysis:
    """A torch.save archive indexed the way the torch-zip reader does (data.pkl + data/<key>)."""
    buf = memoryview(data)
    import io

    zf = zipfile.ZipFile(io.BytesIO(bytes(buf)))
    infos = zf.infolist()
    prefix = infos[0].filename.split("/", 1)[0]
    container = Container(formats=["torch-zip"])
    pkl_info = zf.getinfo(f"{prefix}/data.pkl")
    pkl, pkl_offset = _member_slice(buf, pkl_info)
    stream = PickleStream(
        member=f"{prefix}/data.pkl",
        data=pkl,
        file_offset=pkl_offset,
        role=StreamRole.TORCH_ZIP_DATA,
        persistent_scheme=PersistentScheme.TORCH_ZIP,
        multi=False,
        loadable=True,
    )
    container.streams.append(stream)
    for info in infos:
        if info.filename.startswith(f"{prefix}/data/"):
            key = info.filename[len(f"{prefix}/data/") :]
            piece, offset = _member_slice(buf, info)
            container.storages[key] = StorageEntry(key=key, data=piece, file_offset=offset)
    byteorder = (
        zf.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in zf.namelist() else "little"
    )
    container.meta = {
        "byteorder": byteorder,
        "version": int(zf.read(f"{prefix}/version")),
        "loadable": {"format": "torch-zip", "member": stream.member},
    }
    resolved = policy if isinstance(policy, Policy) else load_policy(policy)
    return Analysis(Report(path), Source(buf), container, resolved, [Stream(stream, pickle_globals(pkl))])


def raw_pickle(data: bytes | bytearray, policy: str | Policy = "strict", path: str = "<test>") -> Analysis:
    buf = memoryview(data)
    stream = PickleStream(member=None, data=buf, file_offset=0, role=StreamRole.RAW, loadable=True)
    container = Container(
        formats=["pickle"], streams=[stream], meta={"loadable": {"format": "pickle", "member": None}}
    )
    resolved = policy if isinstance(policy, Policy) else load_policy(policy)
    return Analysis(Report(path), Source(buf), container, resolved, [Stream(stream, pickle_globals(buf))])


def rezip(data: bytes | bytearray, edit: dict[str, bytes]) -> bytearray:
    """The same archive, stored, with some members' bytes replaced (member names by suffix)."""
    import io

    src = zipfile.ZipFile(io.BytesIO(bytes(data)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            for suffix, replacement in edit.items():
                if info.filename.endswith(suffix):
                    body = replacement
            dst.writestr(info.filename, body)
    return bytearray(out.getvalue())


def data_pkl(data: bytes | bytearray) -> bytes:
    import io

    zf = zipfile.ZipFile(io.BytesIO(bytes(data)))
    return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
