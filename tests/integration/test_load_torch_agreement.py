"""Files torch.save never writes but torch.load reads: safeload loads them as torch.load does, with
either tensor backend, or refuses them where torch.load refuses them too. Found by a differential
fuzzer of the loader against torch.load(weights_only=True); every case is written by torch.save and
edited in one place."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import safeload
from safeload.errors import LoadError
from tests.unit.loader.compare import assert_same


def _legacy(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _with_view(data: bytes, pid_index: int, view_key: str, offset: int, size: int) -> bytes:
    """The legacy file with the pid_index-th storage id's view metadata (None, as torch.save writes
    it) set to (view_key, offset, size)."""
    start = 0
    for _ in range(3):  # magic number, protocol version, sys_info
        start += next(pos for op, _, pos in pickletools.genops(data[start:]) if op.name == "STOP") + 1
    ops = list(pickletools.genops(data[start:]))
    nones = [
        pos
        for (op, _, pos), (after, _, _) in zip(ops, ops[1:], strict=False)
        if op.name == "NONE" and after.name == "TUPLE"
    ]
    key = view_key.encode()
    view = (
        pickle.BINUNICODE + struct.pack("<I", len(key)) + key
        + pickle.BININT1 + bytes([offset]) + pickle.BININT1 + bytes([size]) + pickle.TUPLE3
    )  # fmt: skip
    at = start + nones[pid_index]
    return data[:at] + view + data[at + 1 :]


def _keys(data: bytes) -> list[str]:
    """The legacy file's storage keys, in the order the object pickle names them."""
    start = 0
    for _ in range(3):
        start += next(pos for op, _, pos in pickletools.genops(data[start:]) if op.name == "STOP") + 1
    found: list[str] = []
    for op, arg, _ in pickletools.genops(data[start:]):
        if op.name == "BINUNICODE" and isinstance(arg, str) and arg.isdigit() and arg not in found:
            found.append(arg)
    return found


def _load_all(path: Path) -> tuple[Any, Any, Any]:
    ref = torch.load(path, weights_only=True, map_location="cpu")
    return ref, safeload.load(path, map_location="cpu"), safeload.load(path, framework="numpy")


def _assert_numpy_same(ref: list[torch.Tensor], out: list[np.ndarray]) -> None:
    assert len(out) == len(ref)
    for r, o in zip(ref, out, strict=True):
        assert isinstance(o, np.ndarray) and o.shape == tuple(r.shape)
        assert o.tobytes() == r.contiguous().numpy().tobytes()


def test_legacy_view_key_naming_a_loaded_storage_is_that_storage(tmp_path: Path) -> None:
    # torch keeps storages and views in one table: the view is the storage itself, whole.
    data = _legacy([torch.arange(5.0)[:4]])
    path = tmp_path / "view.pt"
    path.write_bytes(_with_view(data, 0, _keys(data)[0], 1, 4))
    ref, out, arrays = _load_all(path)
    assert ref[0].tolist() == [0.0, 1.0, 2.0, 3.0]  # not [1, 2, 3, 4], the view's own slice
    assert_same(ref, out)
    _assert_numpy_same(ref, arrays)


def test_legacy_view_key_naming_a_loaded_storage_keeps_that_storages_dtype(tmp_path: Path) -> None:
    data = _legacy([torch.arange(4.0).half(), torch.tensor([], dtype=torch.bfloat16)])
    path = tmp_path / "view.pt"
    path.write_bytes(_with_view(data, 1, _keys(data)[0], 0, 0))
    ref, out, arrays = _load_all(path)
    assert ref[1].dtype == torch.float16  # the half storage, not a bfloat16 view
    assert_same(ref, out)
    assert out[1].untyped_storage().data_ptr() == out[0].untyped_storage().data_ptr()
    assert arrays[1].dtype == np.float16


def test_legacy_view_key_naming_a_storage_still_to_come_is_refused(tmp_path: Path) -> None:
    # torch would hand the view out for that storage's key too, and read its bytes into the view.
    data = _legacy([torch.arange(4.0), torch.arange(3.0) + 10])
    path = tmp_path / "view.pt"
    path.write_bytes(_with_view(data, 0, _keys(data)[1], 0, 2))
    for framework in ("torch", "numpy"):
        with pytest.raises(LoadError, match="view key"):
            safeload.load(path, framework=framework)


def _rezipped(obj: Any, edit: Callable[[str, bytes], bytes | None]) -> bytes:
    """torch.save(obj), rewritten member by member: edit(name, body) gives the new body (None drops
    the member)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = edit(info.filename, src.read(info.filename))
            if body is not None:
                dst.writestr(info.filename, body)
    return out.getvalue()


def _zip_with(obj: Any, member: str, body: bytes | None) -> bytes:
    return _rezipped(obj, lambda name, old: body if name.endswith(f"/{member}") else old)


@pytest.mark.parametrize("version", [b" 3", b"3abc", b"+3", b"10\n"], ids=repr)
def test_zip_version_record_torch_reads(tmp_path: Path, version: bytes) -> None:
    path = tmp_path / "v.pt"
    path.write_bytes(_zip_with({"w": torch.arange(3.0)}, "version", version))
    ref, out, _ = _load_all(path)
    assert_same(ref, out)


@pytest.mark.parametrize("version", [b"0\n", b"11\n", b"-1", b"x", b"", None], ids=repr)
def test_zip_version_record_torch_refuses_is_refused(tmp_path: Path, version: bytes | None) -> None:
    path = tmp_path / "v.pt"
    path.write_bytes(_zip_with({"w": torch.arange(3.0)}, "version", version))
    with pytest.raises(RuntimeError):
        torch.load(path, weights_only=True)
    with pytest.raises(LoadError, match="version record"):
        safeload.load(path)


@pytest.mark.parametrize("serialization_id", [b"\xff" * 40, b"12345\xc3", b"\xed\xa0\x80"], ids=repr)
@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_zip_serialization_id_torch_cannot_decode_is_refused(
    tmp_path: Path, serialization_id: bytes, framework: str
) -> None:
    path = tmp_path / "s.pt"
    path.write_bytes(_zip_with({"w": torch.arange(3.0)}, ".data/serialization_id", serialization_id))
    with pytest.raises(UnicodeDecodeError):
        torch.load(path, weights_only=True)
    assert safeload.scan(path).verdict.value == "SAFE"  # nothing in it runs: a loader question only
    with pytest.raises(LoadError, match="serialization id record") as refused:
        safeload.load(path, framework=framework)
    assert refused.value.file_offset is not None


@pytest.mark.parametrize("serialization_id", [b"\xc3\xa9t\xc3\xa9", b"\x00" * 8, b""], ids=repr)
def test_zip_serialization_id_torch_decodes_loads(tmp_path: Path, serialization_id: bytes) -> None:
    path = tmp_path / "s.pt"
    path.write_bytes(_zip_with({"w": torch.arange(3.0)}, ".data/serialization_id", serialization_id))
    ref, out, _ = _load_all(path)
    assert_same(ref, out)


def _zip64_edited(field: str, value: int) -> bytes:
    """torch.save's archive (it always ends in ZIP64 records) with one field of those records set."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(3.0)}, buf)
    data = bytearray(buf.getvalue())
    locator = data.rfind(b"PK\x06\x07")
    record = struct.unpack_from("<Q", data, locator + 8)[0]
    assert locator > 0 and data[record : record + 4] == b"PK\x06\x06"
    if field == "disks":
        struct.pack_into("<I", data, locator + 16, value)  # the locator's total number of disks
    else:
        struct.pack_into("<Q", data, record + 4, value)  # the ZIP64 end record's size of itself
    return bytes(data)


@pytest.mark.parametrize(("field", "value"), [("disks", 0), ("disks", 2), ("size", 0), ("size", 43)])
@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_zip64_records_miniz_refuses_are_refused(
    tmp_path: Path, field: str, value: int, framework: str
) -> None:
    path = tmp_path / "z.pt"
    path.write_bytes(_zip64_edited(field, value))
    if (field, value) != ("disks", 2):  # Python's zipfile refuses more than one disk as well
        assert zipfile.ZipFile(path).testzip() is None  # it reads the rest: torch's reader alone fails
    with pytest.raises(RuntimeError, match="failed reading zip archive"):
        torch.load(path, weights_only=True)
    assert safeload.scan(path).verdict.value == "SAFE"
    with pytest.raises(LoadError, match="ZIP64") as refused:
        safeload.load(path, framework=framework)
    record_at = path.read_bytes().rfind(b"PK\x06\x07" if field == "disks" else b"PK\x06\x06")
    assert refused.value.file_offset == record_at


@pytest.mark.parametrize(("field", "value"), [("disks", 1), ("size", 44), ("size", 1000)])
def test_zip64_records_miniz_reads_load(tmp_path: Path, field: str, value: int) -> None:
    path = tmp_path / "z.pt"
    path.write_bytes(_zip64_edited(field, value))
    ref, out, _ = _load_all(path)
    assert_same(ref, out)


def _neg_view_with(edit: tuple[bytes, bytes]) -> bytes:
    """torch.save of a neg view (its metadata is {'neg': True}) with the metadata's bytes edited."""
    tensor = torch.tensor([1.5, -2.0])._neg_view()
    buf = io.BytesIO()
    torch.save(tensor, buf)
    pkl = zipfile.ZipFile(buf).read("archive/data.pkl")
    assert pkl.count(edit[0]) == 1
    return _zip_with(tensor, "data.pkl", pkl.replace(*edit))


_NEG_KEY = pickle.BINUNICODE + struct.pack("<I", 3) + b"neg"


def test_numpy_backend_sets_a_flag_whatever_its_value_as_torch(tmp_path: Path) -> None:
    # torch sets the neg bit whenever the key is there: {'neg': False} negates too.
    path = tmp_path / "neg.pt"
    path.write_bytes(_neg_view_with((pickle.NEWTRUE + pickle.SETITEM, pickle.NEWFALSE + pickle.SETITEM)))
    ref, out, arrays = _load_all(path)
    assert ref.is_neg() and ref.tolist() == [-1.5, 2.0]
    assert_same(ref, out)
    assert arrays.tolist() == [-1.5, 2.0]


def test_numpy_backend_refuses_conj_on_a_real_tensor_as_torch_does(tmp_path: Path) -> None:
    path = tmp_path / "conj.pt"
    path.write_bytes(_neg_view_with((_NEG_KEY, pickle.BINUNICODE + struct.pack("<I", 4) + b"conj")))
    with pytest.raises(RuntimeError):
        torch.load(path, weights_only=True)
    with pytest.raises(LoadError, match="conj"):
        safeload.load(path, framework="numpy")


def test_numpy_backend_keeps_0d_tensors_with_flags_as_arrays(tmp_path: Path) -> None:
    path = tmp_path / "flags.pt"
    obj = {"c": torch.tensor(1 + 2j, dtype=torch.complex64).conj(), "n": torch.tensor(2.0)._neg_view()}
    torch.save(obj, path)
    arrays = safeload.load(path, framework="numpy")
    for key, value in obj.items():
        assert type(arrays[key]) is np.ndarray and arrays[key].shape == ()
        assert arrays[key].item() == value.resolve_conj().resolve_neg().item()


def test_numpy_backend_big_endian_views_share_the_swapped_storage(tmp_path: Path) -> None:
    # As torch: a big-endian file's storage is swapped once, by its own dtype (a complex one by its
    # parts), and every view of it shares those bytes, whatever dtype the view reads them as.
    base = torch.arange(12, dtype=torch.float32)
    cbase = (torch.arange(4) + 1j * torch.arange(4)).to(torch.complex64)
    obj = {"base": base, "t": base.view(3, 4).t(), "c": cbase, "c2": cbase[1:]}

    def as_big_endian(name: str, body: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name and not name.endswith("serialization_id"):
            return np.frombuffer(body, "<u4").byteswap().tobytes()  # float32 and complex64 parts
        return body

    path = tmp_path / "big.pt"
    path.write_bytes(_rezipped(obj, as_big_endian))
    ref, _, arrays = _load_all(path)
    for key in obj:
        assert (
            np.array_equal(arrays[key], ref[key].numpy()) and arrays[key].strides == ref[key].numpy().strides
        )
    assert np.shares_memory(arrays["base"], arrays["t"]) and np.shares_memory(arrays["c"], arrays["c2"])


def test_two_legacy_saves_to_one_file_load_the_first_as_torch(tmp_path: Path) -> None:
    path = tmp_path / "two.pt"
    with path.open("wb") as f:
        torch.save({"a": torch.arange(3.0)}, f, _use_new_zipfile_serialization=False)
        torch.save({"b": torch.ones(2)}, f, _use_new_zipfile_serialization=False)
    assert safeload.scan(path).verdict is safeload.Verdict.SAFE
    ref, out, arrays = _load_all(path)
    assert_same(ref, out)
    assert list(arrays) == ["a"] and arrays["a"].tolist() == [0.0, 1.0, 2.0]


def test_loads_on_one_handle_read_one_legacy_checkpoint_each_as_torch(tmp_path: Path) -> None:
    path = tmp_path / "two.pt"
    with path.open("wb") as f:
        f.write(b"head")
        for i in range(2):
            torch.save({"i": torch.tensor([float(i)])}, f, _use_new_zipfile_serialization=False)
    with path.open("rb") as ref_file, path.open("rb") as f:
        ref_file.seek(4)
        f.seek(4)
        for _ in range(2):
            ref = torch.load(ref_file, weights_only=True)
            assert_same(ref, safeload.load(f))
            assert f.tell() == ref_file.tell()
        assert f.read() == b""
