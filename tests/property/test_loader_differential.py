"""Mutated torch files against torch.load itself: whatever torch's unpickler asks for, the scan saw.

Each mutant rewrites fields of a real torch.save archive's zip records (offsets, sizes, counts,
name lengths, the ZIP64 records) the way evasion tricks do, or bytes of a legacy-format file. torch.load(weights_only=False) then reads it in
a subprocess whose pickle module records every global the unpickler asks for and hands back an inert
stub for any it does not know, so nothing a file names ever runs. The scan must have listed every
such global, unless a limit stopped it (then it says so). Longer runs of this kind, against
torch.load and numpy.load, found two divergences (a ZIP64 locator pointing at no record; an npz's
second central directory): both are fixed, and this test fails on the first.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.property.recording import assert_the_scan_saw, record_loads
from tests.unit.formats.torchfiles import save_checkpoint

pytestmark = pytest.mark.slow

MUTANTS = 400

# Reads paths from stdin; prints, per path, the globals torch's unpickler asked for.
_LOAD_WITH_TORCH = r"""
import torch

REAL = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter")}

class Recording(pickle.Unpickler):
    def find_class(self, module, name):
        module, name = record(module, name)
        if (module, name) in REAL:
            return super().find_class(module, name)
        return Inert

class Module:
    Unpickler = Recording
    @staticmethod
    def load(f, **kwargs):
        return Recording(f, **kwargs).load()

for line in sys.stdin:
    asked.clear()
    try:
        torch.load(line.strip(), map_location="cpu", weights_only=False, pickle_module=Module)
    except Exception:
        pass
    print(json.dumps(asked), flush=True)
"""

_RECORDS = {
    b"PK\x03\x04": [(6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
    b"PK\x01\x02": [(8, 2), (10, 2), (20, 4), (24, 4), (28, 2), (30, 2), (34, 2), (42, 4)],
    b"PK\x05\x06": [(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
    b"PK\x06\x06": [(24, 8), (32, 8), (40, 8), (48, 8)],
    b"PK\x06\x07": [(8, 8)],
}


def _fields(data: bytes) -> list[list[tuple[int, int]]]:
    """(offset, size) of every integer field, one list per kind of record (a kind is picked first,
    so that the few end records are mutated as often as the many member records)."""
    out = []
    for sig, fields in _RECORDS.items():
        kind = []
        at = data.find(sig)
        while at != -1:
            kind += [(at + off, size) for off, size in fields if at + off + size <= len(data)]
            at = data.find(sig, at + 1)
        if kind:
            out.append(kind)
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        kinds = _fields(bytes(out))
        if not kinds:
            # No zip record (the legacy format): a byte anywhere, most often a length or an opcode.
            out[rng.randrange(len(out))] = rng.randrange(256)
            continue
        at, size = rng.choice(rng.choice(kinds))
        fields = [f for kind in kinds for f in kind]
        old = int.from_bytes(out[at : at + size], "little")
        pick = rng.random()
        if pick < 0.35:
            new = old + rng.choice((-64, -30, -2, -1, 1, 2, 30, 64))
        elif pick < 0.7:
            # another field's value: offsets and sizes that point at real records
            other_at, other_size = rng.choice([f for f in fields if f[1] == size])
            new = int.from_bytes(out[other_at : other_at + other_size], "little")
        else:
            new = rng.choice((0, 1, 8, 0x0808, (1 << (8 * size)) - 1, rng.getrandbits(8 * size)))
        out[at : at + size] = (new % (1 << (8 * size))).to_bytes(size, "little")
    return bytes(out)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    evil, good = tmp_path_factory.mktemp("evil"), tmp_path_factory.mktemp("good")
    return [
        save_checkpoint(good / "model.pt"),
        save_checkpoint(evil / "model.pt", payload=True),
        save_checkpoint(good / "legacy.pt", legacy=True),
        save_checkpoint(evil / "legacy.pt", payload=True, legacy=True),
    ]


def test_what_torch_asks_for_the_scan_saw(archives: list[bytes], tmp_path: Path, marker: Path) -> None:
    rng = random.Random(20261123)
    paths = []
    for i in range(MUTANTS):
        path = tmp_path / f"mutant{i}.pt"
        path.write_bytes(mutate(archives[i % len(archives)], rng))
        paths.append(path)
    asked_per_file = record_loads(_LOAD_WITH_TORCH, [str(p) for p in paths], marker.parent)
    # Only a limit may stop the scan short of what torch reads (a huge memo index, say).
    assert assert_the_scan_saw(paths, asked_per_file, "torch") > MUTANTS // 4
