"""Mutated compressed pickles against Python's own readers: whatever the unpickler asks for through
gzip.open, bz2.open or lzma.open (as pandas.read_pickle and plain scripts read them), the scan saw.

Each mutant is a real gzip, bz2 or xz stream of a pickle (one member, a pickle split across two
members, a benign member before a payload), then damaged: header bytes, trailer bytes, truncation,
inserted and appended bytes. A subprocess reads each with pickle.load through the matching reader,
recording every global the unpickler asks for and handing back an inert stub, so nothing a file
names ever runs. A reader hands over data before it checks it (gzip.py tests a member's CRC at the
next read; every reader returns 8 KiB steps before a block's check fails), so the scan must have
listed every such global, unless a limit stopped it. A campaign of this kind found gzip headers
zlib refuses and gzip.py reads, and members scanned not at all for a bad trailer: this test fails
on both.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import random
from pathlib import Path

import pytest

from tests.pickle_builder import exec_payload
from tests.property.recording import assert_the_scan_saw, record_loads

pytestmark = pytest.mark.slow

MUTANTS = 500

# Reads "path<TAB>reader" lines; prints, per line, the globals the unpickler asked for.
_LOAD_THROUGH_READERS = r"""
import bz2, gzip, lzma

class Recording(pickle.Unpickler):
    def find_class(self, module, name):
        record(module, name)
        return Inert

READERS = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}
for line in sys.stdin:
    path, reader = line.rstrip("\n").split("\t")
    asked.clear()
    try:
        with READERS[reader](path, "rb") as f:
            Recording(f).load()
    except Exception:
        pass
    print(json.dumps(asked), flush=True)
"""


def _gzip_named(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="model.pkl", mode="wb", fileobj=out, mtime=0) as g:
        g.write(data)
    return out.getvalue()


WRITERS = {
    "gzip": [gzip.compress, _gzip_named],
    "bz2": [bz2.compress],
    "xz": [lzma.compress],
}


def _seed(rng: random.Random, marker: Path) -> tuple[str, bytes]:
    reader = rng.choice(["gzip", "gzip", "bz2", "xz"])
    write = rng.choice(WRITERS[reader])
    protocol = rng.randint(0, 5)
    benign = pickle.dumps({"w": list(range(rng.randint(0, 30))), "name": "model"}, protocol=protocol)
    evil = exec_payload(marker, protocol=min(protocol, 2))
    shape = rng.random()
    if shape < 0.4:
        return reader, write(evil)
    if shape < 0.6:
        cut = rng.randrange(1, len(evil))
        return reader, write(evil[:cut]) + write(evil[cut:])  # one pickle across two members
    if shape < 0.9:
        return reader, write(benign) + write(evil)
    return reader, write(benign)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
        if not out:
            break
        # Headers and trailers are where readers part: most edits land near either end.
        near = rng.random()
        if near < 0.4:
            at = rng.randrange(min(len(out), 32))
        elif near < 0.7:
            at = max(0, len(out) - 1 - rng.randrange(min(len(out), 16)))
        else:
            at = rng.randrange(len(out))
        edit = rng.random()
        if edit < 0.5:
            out[at] ^= 1 << rng.randrange(8)
        elif edit < 0.65:
            del out[at : at + rng.randint(1, 4)]
        elif edit < 0.8:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        elif edit < 0.9:
            out += bytes(rng.randint(1, 20)) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 20))
        else:
            del out[rng.randrange(len(out)) :]
    return bytes(out)


def test_what_the_unpickler_asks_for_through_a_decompressing_reader_the_scan_saw(
    tmp_path: Path, marker: Path
) -> None:
    rng = random.Random(20261123)
    cases = []
    for i in range(MUTANTS):
        reader, data = _seed(rng, marker)
        path = tmp_path / f"mutant{i}"
        path.write_bytes(_mutate(data, rng))
        cases.append((path, reader))
    asked_per_file = record_loads(_LOAD_THROUGH_READERS, [f"{p}\t{r}" for p, r in cases], marker.parent)
    assert assert_the_scan_saw([p for p, _ in cases], asked_per_file, "the unpickler") > MUTANTS // 4
