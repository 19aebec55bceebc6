"""Build pickle bytes opcode by opcode, for malicious fixtures with harmless payloads.

Every payload here only creates a marker file under a test's tmp dir; tests assert it never appears.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

MARK = pickle.MARK
STOP = pickle.STOP
REDUCE = pickle.REDUCE
BUILD = pickle.BUILD
TUPLE = pickle.TUPLE
EMPTY_TUPLE = pickle.EMPTY_TUPLE
EMPTY_DICT = pickle.EMPTY_DICT
EMPTY_LIST = pickle.EMPTY_LIST
NONE = pickle.NONE
MEMOIZE = pickle.MEMOIZE
POP = pickle.POP
STACK_GLOBAL = pickle.STACK_GLOBAL
NEWOBJ = pickle.NEWOBJ
NEWOBJ_EX = pickle.NEWOBJ_EX
OBJ = pickle.OBJ
SETITEM = pickle.SETITEM
SETITEMS = pickle.SETITEMS
APPEND = pickle.APPEND
TUPLE1 = pickle.TUPLE1
TUPLE2 = pickle.TUPLE2
TUPLE3 = pickle.TUPLE3


def proto(n: int) -> bytes:
    return pickle.PROTO + bytes([n])


def glob(module: str, name: str) -> bytes:
    """GLOBAL (protocol 0-3 style): module and name as newline-terminated text."""
    return pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n"


def inst(module: str, name: str) -> bytes:
    return pickle.INST + module.encode() + b"\n" + name.encode() + b"\n"


def unicode(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def string0(s: str) -> bytes:
    """Protocol-0 STRING opcode (repr-quoted)."""
    return pickle.STRING + repr(s).encode() + b"\n"


def binint(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)


def stack_global(module: str, name: str) -> bytes:
    return unicode(module) + unicode(name) + STACK_GLOBAL


def put(i: int) -> bytes:
    return pickle.BINPUT + bytes([i])


def get(i: int) -> bytes:
    return pickle.BINGET + bytes([i])


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def frame(body: bytes, declared: int | None = None) -> bytes:
    length = len(body) if declared is None else declared
    return pickle.FRAME + struct.pack("<Q", length) + body


def call(callable_ops: bytes, *args: bytes) -> bytes:
    """callable(*args) through REDUCE."""
    return callable_ops + tup(*args) + REDUCE


def marker_code(marker: Path) -> str:
    """Python source that only creates the marker file."""
    return f"open({str(marker)!r}, 'w').close()"


def wrap(body: bytes, protocol: int = 2) -> bytes:
    """PROTO + body + STOP (no PROTO for protocol 0/1)."""
    head = proto(protocol) if protocol >= 2 else b""
    return head + body + STOP


def exec_payload(marker: Path, protocol: int = 2, module: str = "builtins", name: str = "exec") -> bytes:
    """`exec("open(marker,'w').close()")` with GLOBAL + REDUCE."""
    arg = unicode(marker_code(marker)) if protocol >= 1 else string0(marker_code(marker))
    return wrap(call(glob(module, name), arg), protocol)


def system_payload(marker: Path, protocol: int = 2) -> bytes:
    """`os.system("touch marker")`."""
    arg = unicode(f"touch {marker}") if protocol >= 1 else string0(f"touch {marker}")
    return wrap(call(glob("os", "system"), arg), protocol)


def real_load_in_subprocess(data: bytes, workdir: Path, mode: str = "loads", timeout: float = 120):  # type: ignore[no-untyped-def]
    """Unpickle ``data`` with the real CPython loader in a child process (to prove a fixture is live).

    ``mode``: "loads" (pickle.loads), "file" (pickle.load of open()), "bytesio" (pickle.load of
    io.BytesIO), "all" (pickle.load of open() until the file ends, as a multi-pickle reader does),
    "joblib" (joblib.load, which unpickles any file with pickle.py's pure-Python unpickler), "gzip"
    and "xz" (pickle.load of gzip.open or lzma.open, as pandas.read_pickle reads a compressed file),
    "zstd" (pickle.load of zstandard.open).
    Only for fixtures whose payload is harmless (it creates a marker under ``workdir``).
    """
    import subprocess
    import sys

    path = workdir / "live_fixture.pkl"
    path.write_bytes(data)
    script = {
        "loads": "pickle.loads(open(p, 'rb').read())",
        "file": "pickle.load(open(p, 'rb'))",
        "bytesio": "pickle.load(io.BytesIO(open(p, 'rb').read()))",
        "all": "f = open(p, 'rb')\nwhile f.peek(1): pickle.load(f)",
        "joblib": "import joblib\njoblib.load(p)",
        "gzip": "import gzip\npickle.load(gzip.open(p))",
        "xz": "import lzma\npickle.load(lzma.open(p))",
        "zstd": "import zstandard\npickle.load(zstandard.open(p))",
    }[mode]
    code = f"import io, pickle, sys\np = sys.argv[1]\n{script}\n"
    return subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=workdir,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
