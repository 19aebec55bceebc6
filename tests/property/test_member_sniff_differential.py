"""Archive members against CPython's unpicklers: a member detection takes for no pickle is one
neither pickle.load nor pickle.py's unpickler (joblib.load) would import anything from.

Detection decides by a strict opcode scan (raw.sniff) whether a member of a tar or zip is a pickle:
a member it passes over is never walked, so a SAFE archive rests on that decision. Each member here
is opcode-led bytes: text-like tokens, opcode fragments and damaged real pickles. Each is loaded in
a subprocess by both unpicklers, whose find_class records the module and hands back an inert stub
(refusing, as __import__ would, a module name that is no identifier). Where the archive scans SAFE,
no module may have been asked for. A campaign of this kind found GLOBAL and INST lines that
pickle.py completes from the end of the data, and names that are no identifier after a module that
is one: this test fails on the sniff before 53829a4.
"""

from __future__ import annotations

import io
import pickle
import random
import tarfile
from pathlib import Path

import pytest

import safeload
from safeload.formats import raw
from tests.property.recording import record_loads

pytestmark = pytest.mark.slow

MEMBERS = 600

_LOAD_BOTH_WAYS = r"""
import io, re
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")

def recording(base):
    class Recording(base):
        def find_class(self, module, name):
            if not IDENTIFIER.match(module):
                raise ModuleNotFoundError(module)  # what __import__ finds for it on any install
            record(module, name, False)
            return Inert
    return Recording

for line in sys.stdin:
    asked.clear()
    data = bytes.fromhex(line.strip())
    for base in (pickle.Unpickler, pickle._Unpickler):
        try:
            recording(base)(io.BytesIO(data)).load()
        except Exception:
            pass
    print(json.dumps(asked), flush=True)
"""

_TOKENS = [
    b"MIT", b"cos\n", b"system\n", b"\n", b" ", b"(", b"S'", b"'", b"tR.", b"I1", b"c", b"i",
    b"builtins", b"exec", b"!x", b"0", b"p0\n", b"g0\n", b"\x80\x02", b"\x93", b"\x8c\x03abc",
    b"antigravity", b"}", b"]", b"u", b"s", b"a", b"b", b"R", b"o", b".",
]  # fmt: skip


def _member(rng: random.Random) -> bytes:
    if rng.random() < 0.7:
        opcodes = sorted(raw.OPCODES)
        return bytes([rng.choice(opcodes)]) + b"".join(rng.choice(_TOKENS) for _ in range(rng.randint(0, 10)))
    damaged = bytearray(
        pickle.dumps(rng.choice([{"a": 1}, [1, 2, "x"], ("t", 1.5)]), protocol=rng.randint(0, 5))
    )
    for _ in range(rng.randint(1, 3)):
        damaged[rng.randrange(len(damaged))] = rng.randrange(256)
    return bytes(damaged[: rng.randint(1, len(damaged))])


def test_a_member_detection_passes_over_imports_nothing(tmp_path: Path, marker: Path) -> None:
    rng = random.Random(20261124)
    members = [_member(rng) for _ in range(MEMBERS)]
    asked = record_loads(_LOAD_BOTH_WAYS, [m.hex() for m in members], marker.parent)
    passed_over = 0
    for i, (member, names) in enumerate(zip(members, asked, strict=True)):
        path = tmp_path / f"a{i}.tar"
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("model.pkl")
            info.size = len(member)
            tar.addfile(info, io.BytesIO(member))
        report = safeload.scan(path)
        if report.verdict.value == "SAFE":
            passed_over += not report.streams
            assert not names, f"{member!r}: SAFE, but an unpickler asked for {names}"
    assert passed_over > MEMBERS // 3  # enough members were taken for no pickle to mean something
