"""Mutated compressed pickles against the readers that open them: whatever the unpickler asks for
through gzip.open, bz2.open, lzma.open (as pandas.read_pickle and plain scripts read them),
lz4.frame.open or zstandard's readers, the scan saw.

Each mutant is a real stream of a pickle (one member, a pickle split across two members, a benign
member before a payload), then damaged: header bytes, trailer bytes, truncation, inserted and
appended bytes. The second test uses pickles of up to 300 KB, damaged near their end, so that
the error falls after several of the readers' 8 KiB reads. A subprocess reads each with pickle.load through the matching reader,
recording every global the unpickler asks for and handing back an inert stub, so nothing a file
names ever runs. A reader hands over data before it checks it (gzip.py tests a member's CRC at the
next read; every reader returns 8 KiB steps before a block's check fails), so the scan must have
listed every such global, unless a limit stopped it. A campaign of this kind found gzip headers
zlib refuses and gzip.py reads, and members scanned not at all for a bad trailer: the first test
fails on both. Another found zstd frames whose bad checksum hid their data, and data lzma.open
handed over before an error that a decoder fed more input at once raised with it: the second
test fails on both.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import random
from collections.abc import Callable
from pathlib import Path

import lz4.frame
import pytest
import zstandard

from tests.pickle_builder import call, exec_payload, marker_code, stack_global, unicode, wrap
from tests.property.recording import assert_the_scan_saw, record_loads

pytestmark = pytest.mark.slow

MUTANTS = 500

# Reads "path<TAB>reader" lines; prints, per line, the globals the unpickler asked for.
_LOAD_THROUGH_READERS = r"""
import bz2, gzip, lzma, lz4.frame, zstandard

def zstd_across_frames(path, mode):
    return zstandard.ZstdDecompressor().stream_reader(open(path, mode), read_across_frames=True)

class Recording(pickle.Unpickler):
    def find_class(self, module, name):
        record(module, name)
        return Inert

READERS = {
    "gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open, "lz4": lz4.frame.open,
    "zstd": zstandard.open, "zstd-frames": zstd_across_frames,
}
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


def _lz4(rng: random.Random) -> Callable[[bytes], bytes]:
    checks, size = rng.random() < 0.5, rng.choice([0, 4, 5])  # block sizes 64 KiB, 256 KiB
    return lambda d: lz4.frame.compress(d, content_checksum=checks, block_checksum=checks, block_size=size)


def _zstd(rng: random.Random) -> Callable[[bytes], bytes]:
    out = zstandard.ZstdCompressor(write_checksum=rng.random() < 0.7)
    skippable = b"\x50\x2a\x4d\x18\x03\x00\x00\x00abc" if rng.random() < 0.3 else b""
    return lambda d: skippable + out.compress(d)


# Per reader: draws a writer of that format from the rng.
WRITERS: dict[str, Callable[[random.Random], Callable[[bytes], bytes]]] = {
    "gzip": lambda rng: rng.choice([gzip.compress, _gzip_named]),
    "bz2": lambda rng: bz2.compress,
    "xz": lambda rng: rng.choice([lzma.compress, lambda d: lzma.compress(d, check=lzma.CHECK_SHA256)]),
    "lz4": _lz4,
    "zstd": _zstd,
    "zstd-frames": _zstd,
}
# zstandard's readers have no readline: a pickle with text opcodes never loads through them.
_BINARY_ONLY = {"zstd", "zstd-frames"}


def _binary_exec(marker: Path, before: bytes = b"") -> bytes:
    pushed = before + pickle.POP if before else b""
    return wrap(pushed + call(stack_global("builtins", "exec"), unicode(marker_code(marker))), 4)


def _seed(rng: random.Random, marker: Path, readers: list[str], big: bool) -> tuple[str, bytes]:
    reader = rng.choice(readers)
    write = WRITERS[reader](rng)
    protocol = rng.randint(2 if reader in _BINARY_ONLY else 0, 5)
    benign = pickle.dumps({"w": list(range(rng.randint(0, 30))), "name": "model"}, protocol=protocol)
    if big:
        n = rng.randint(4_000, 300_000)
        blob = rng.randbytes(n // 2) + bytes(n - n // 2)  # half incompressible
        evil = _binary_exec(marker, pickle.BINBYTES + len(blob).to_bytes(4, "little") + blob)
    elif reader in _BINARY_ONLY or rng.random() < 0.3:
        evil = _binary_exec(marker)
    else:
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


def _mutate(data: bytes, rng: random.Random, *, near_the_end: bool = False) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
        if not out:
            break
        # Headers and trailers are where readers part: most edits land near either end.
        near = rng.random() if not near_the_end else rng.choice((0.5, 0.5, 0.9))
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


def _differential(tmp_path: Path, marker: Path, seed: int, readers: list[str], big: bool) -> None:
    rng = random.Random(seed)
    cases = []
    for i in range(MUTANTS):
        reader, data = _seed(rng, marker, readers, big)
        path = tmp_path / f"mutant{i}"
        path.write_bytes(_mutate(data, rng, near_the_end=big))
        cases.append((path, reader))
    asked_per_file = record_loads(_LOAD_THROUGH_READERS, [f"{p}\t{r}" for p, r in cases], marker.parent)
    assert assert_the_scan_saw([p for p, _ in cases], asked_per_file, "the unpickler") > MUTANTS // 6


def test_what_the_unpickler_asks_for_through_a_decompressing_reader_the_scan_saw(
    tmp_path: Path, marker: Path
) -> None:
    _differential(
        tmp_path, marker, 20261123, ["gzip", "gzip", "bz2", "xz", "lz4", "zstd", "zstd-frames"], False
    )


def test_large_pickles_damaged_near_their_end(tmp_path: Path, marker: Path) -> None:
    _differential(tmp_path, marker, 20261124, sorted(WRITERS), True)
