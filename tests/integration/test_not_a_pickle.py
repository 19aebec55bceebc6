"""Files that start with a pickle opcode byte and hold no pickle: text, HDF5, GGUF.

A model registry keeps them beside its checkpoints (LICENSE, NOTICE, Keras .h5, llama.cpp .gguf).
Read as a pickle they break before anything is imported or called, so no loader runs anything from
them: they are SL204, no model format, which a directory walk skips, not SL200, a malformed pickle
that makes the whole audit UNSCANNABLE. A real pickle that breaks stays SL200, and one that imports
before it breaks stays what its imports make it.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from pathlib import Path

import gguf
import h5py
import msgpack
import numpy as np
import pytest
import torch

import safeload
from safeload.audit import AuditOptions, audit
from safeload.cli import main
from safeload.formats import raw
from safeload.model import Verdict
from tests.pickle_builder import exec_payload

MIT = b"MIT License\n\nCopyright (c) 2024 The Authors\n\nPermission is hereby granted, free of charge\n"


def _hdf5(path: Path) -> None:
    with h5py.File(path, "w") as f:  # what Keras writes its weights into
        f.create_dataset("dense/kernel", data=np.ones((3, 3), dtype=np.float32))


def _gguf(path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _flax(*modules: str) -> Callable[[Path], None]:
    """A state dict as flax.serialization.to_bytes writes it: msgpack, arrays as extension types.
    A map of 2 to 4 keys starts with the byte of EXT1, EXT2 or EXT4."""

    def array(a: np.ndarray) -> msgpack.ExtType:
        return msgpack.ExtType(1, msgpack.packb((a.shape, a.dtype.name, a.tobytes())))

    state = {m: {"kernel": array(np.ones((2, 2), np.float32))} for m in modules}
    return lambda path: path.write_bytes(msgpack.packb(state))


def _text(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


NOT_PICKLES: dict[str, Callable[[Path], None]] = {
    "LICENSE": _text(MIT),  # BININT2, then a space: no opcode
    "NOTICE": _text(b"Copyright 2024 The Authors. Licensed under the Apache License, Version 2.0.\n" * 3),
    "notes.txt": _text(b"Some notes on training\n"),  # STRING without quotes
    "model.h5": _hdf5,
    "model.gguf": _gguf,
    "flax_model.msgpack": _flax("params"),
    "flax-bert.msgpack": _flax("bert", "cls"),  # EXT1, then BUILD on too short a stack
    "flax-3.msgpack": _flax("bert", "cls", "pooler"),  # EXT2
    "flax-4.msgpack": _flax("a", "b", "c", "d"),  # EXT4
    "flax-query.msgpack": _flax("query", "key"),  # EXT1, then BINPUT: a memo store, no use
    # EXT1, then LONG_BINPUT at index 2.8 billion, past the memo limit: CPython grows its memo to
    # it (or fails for memory) and breaks at the next opcode
    "flax-rng.msgpack": _flax("rng", "params"),
}


class _Recording(pickle.Unpickler):
    """CPython's unpickler that records instead of importing or resolving anything."""

    def __init__(self, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.asked: list[str] = []

    def find_class(self, module: str, name: str) -> object:
        self.asked.append(f"{module}.{name}")
        raise pickle.UnpicklingError("not here")


@pytest.mark.parametrize("name", sorted(NOT_PICKLES))
def test_bytes_that_start_like_a_pickle_and_are_none_are_no_model_format(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    NOT_PICKLES[name](path)
    data = path.read_bytes()
    assert raw.is_opcode(data[0])  # the case at hand: a loader would try to unpickle it
    unpickler = _Recording(data)
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever CPython says, it says it before acting
        unpickler.load()
    assert unpickler.asked == []
    report = safeload.scan(path)
    assert [f.code for f in report.findings] == ["SL204"]
    assert report.formats == () and report.streams == ()
    assert report.verdict is Verdict.UNSCANNABLE  # named, an unknown format is still no verdict
    assert "before anything is imported or called" in report.findings[0].message
    with pytest.raises(safeload.errors.UnsupportedFormatError):
        safeload.load(path)


def test_a_registry_with_them_is_audited_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "registry"
    tree.mkdir()
    for name, build in NOT_PICKLES.items():
        build(tree / name)
    torch.save({"w": torch.ones(3)}, tree / "pytorch_model.bin")
    (tree / "LICENSE.gz").write_bytes(gzip.compress(MIT))

    run = audit([str(tree)], AuditOptions())
    assert [Path(r.path).name for r in run.reports] == ["pytorch_model.bin"]
    assert sorted(Path(p).name for p in run.skipped) == sorted([*NOT_PICKLES, "LICENSE.gz"])
    assert run.exit_code == 0

    assert main(["scan", str(tree)]) == 0
    assert main(["audit", str(tree)]) == 0
    progress = capsys.readouterr().err
    assert f"skipped     {tree / 'LICENSE'}" in progress and "UNSCANNABLE" not in progress


@pytest.mark.parametrize(
    "text",
    [b"Permission is hereby granted\nobtaining a copy\n", b")Permission is hereby granted"],
    ids=["persid", "unterminated-persid"],
)
def test_text_that_reads_as_a_persistent_id_stays_a_broken_pickle(text: bytes, tmp_path: Path) -> None:
    """A persistent id is a call into the loader's persistent_load (pickle.py makes it even for a
    last line without its newline): such bytes are never called inert."""
    path = tmp_path / "PERMISSION"
    path.write_bytes(text)
    report = safeload.scan(path)
    assert "SL204" not in {f.code for f in report.findings}
    assert report.verdict is not Verdict.SAFE


@pytest.mark.parametrize(
    "data",
    [
        b"\x82\x01)R",
        b"\x82\x01q\x00h\x00)R",
        b"\x82\x01\x82\x02\xff",
        b"\x82\x01r\x00\x00\x00\x10)R",
        b"\x82\x01r\x00\x00\x00\x10j\x00\x00\x00\x10)R",
    ],
    ids=[
        "called",
        "stored-then-called",
        "two-lookups",
        "huge-index-then-called",
        "huge-index-fetched-called",
    ],
)
def test_an_extension_lookup_whose_object_may_be_used_is_never_inert(data: bytes, tmp_path: Path) -> None:
    """The one lookup an inert file may make is an EXT whose object nothing after it touches."""
    path = tmp_path / "ext.bin"
    path.write_bytes(data)
    report = safeload.scan(path)
    assert "SL103" in {f.code for f in report.findings}
    assert report.verdict is Verdict.UNSAFE


def test_compressed_text_is_no_model_format_either(tmp_path: Path) -> None:
    path = tmp_path / "LICENSE.gz"
    path.write_bytes(gzip.compress(MIT))
    report = safeload.scan(path)
    assert report.formats == ("gzip",)
    assert [f.code for f in report.findings] == ["SL204"]


def test_a_broken_real_pickle_stays_malformed(tmp_path: Path) -> None:
    """A PROTO header is a pickle's structure: cut short, it is a malformed pickle, reported."""
    path = tmp_path / "truncated.pkl"
    path.write_bytes(pickle.dumps({"weights": list(range(100))}, protocol=4)[:12])
    report = safeload.scan(path)
    assert report.formats == ("pickle",)
    assert "SL200" in {f.code for f in report.findings} and "SL204" not in {f.code for f in report.findings}


def test_a_long_run_of_opcodes_is_a_pickle_though_it_breaks(tmp_path: Path) -> None:
    path = tmp_path / "proto0.pkl"
    path.write_bytes(pickle.dumps(list(range(100)), protocol=0)[:-20])  # no PROTO: protocol 0
    report = safeload.scan(path)
    assert [f.code for f in report.findings] == ["SL200"]


@pytest.mark.parametrize("protocol", [0, 2])
def test_bytes_that_import_before_they_break_are_judged_by_what_they_import(
    protocol: int, tmp_path: Path, marker: Path
) -> None:
    """The payload of a broken pickle runs before the unpickler fails (nullifAI): never no format."""
    path = tmp_path / "broken.pkl"
    path.write_bytes(exec_payload(marker, protocol=protocol)[:-1] + b"\xff garbage")
    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSAFE
    assert "builtins.exec" in report.globals
    assert "SL204" not in {f.code for f in report.findings}
    assert not marker.exists()


def test_a_walk_reports_a_broken_real_pickle_as_both_commands_do(tmp_path: Path) -> None:
    """`scan DIR` and `audit DIR` skip the same files: a pickle cut short is no such file."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "LICENSE").write_bytes(MIT)
    (tree / "partial.pkl").write_bytes(pickle.dumps({"weights": list(range(100))}, protocol=2)[:12])
    assert main(["scan", str(tree)]) == 2
    run = audit([str(tree)], AuditOptions())
    assert [Path(r.path).name for r in run.reports] == ["partial.pkl"]
    assert [Path(p).name for p in run.skipped] == ["LICENSE"]
    assert run.exit_code == 2


def test_a_hugging_face_ref_is_skipped_by_both_walks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """refs/main holds a commit id: 40 hex digits, which pickle.py reads as GLOBAL of a module no
    one can import. The audit lists it as skipped; `scan DIR` does too. Named, it is scanned."""
    ref = tmp_path / "models--org--m" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_bytes(b"c0d1e2b3c4d5e6f708192a3b4c5d6e7f8093f2a9\n")
    assert main(["scan", str(tmp_path)]) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert [Path(p).name for p in audit([str(tmp_path)], AuditOptions()).skipped] == ["main"]
    assert main(["scan", str(ref)]) != 0
