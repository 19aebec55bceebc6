"""tar and 7z: real archives from tarfile and py7zr, malicious members, links, damage, limits."""

from __future__ import annotations

import gzip
import io
import pickle
import random
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import py7zr
import pytest

from safeload.formats import archives, compressed
from safeload.limits import Limits
from tests.pickle_builder import exec_payload, system_payload
from tests.unit.formats._samples import codes, foreign_samples, imports, make_ctx, tar_bytes

BENIGN = pickle.dumps({"weights": list(range(100))}, protocol=2)


def sevenz_bytes(members: dict[str, bytes], **kw: object) -> bytes:
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", **kw) as z:  # type: ignore[arg-type]
        for name, data in members.items():
            z.writestr(data, name)
    return buf.getvalue()


# -- tar ------------------------------------------------------------------------------------------


def test_tar_members_are_zero_copy_children(marker: Path) -> None:
    payload = exec_payload(marker)
    data = tar_bytes({"model/config.pkl": BENIGN, "model/weights.pkl": payload})
    buf = memoryview(data)
    assert archives.sniff(buf)
    result = archives.read(buf, make_ctx(file_offset=1000, encoding=("gzip",)))
    assert result.format == "tar"
    assert codes(result) == []
    by_name = {c.name: c for c in result.children}
    assert set(by_name) == {"model/config.pkl", "model/weights.pkl"}
    child = by_name["model/weights.pkl"]
    assert bytes(child.data) == payload
    assert imports(child.data) == ["builtins.exec"]
    # The child is a slice of the buffer, at its place in the file.
    start = child.file_offset - 1000
    assert data[start : start + len(payload)] == payload
    assert child.data.obj is buf.obj
    assert child.encoding == ("gzip",)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_tar_dialect_and_long_names(fmt: int) -> None:
    name = "deep/" * 40 + "model.pkl"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        info = tarfile.TarInfo(name if fmt != tarfile.USTAR_FORMAT else "model.pkl")
        info.size = len(BENIGN)
        tf.addfile(info, io.BytesIO(BENIGN))
    result = archives.read(memoryview(buf.getvalue()), make_ctx())
    assert codes(result) == []
    assert [bytes(c.data) for c in result.children] == [BENIGN]


def test_nested_gzip_in_tar_reaches_the_payload(marker: Path) -> None:
    payload = system_payload(marker)
    data = tar_bytes({"readme.txt": b"hello", "model.pkl.gz": gzip.compress(payload)})
    result = archives.read(memoryview(data), make_ctx())
    inner = next(c for c in result.children if compressed.sniff(c.data))
    unwrapped = compressed.read(inner.data, make_ctx(member=inner.name, encoding=inner.encoding))
    assert codes(unwrapped) == []
    assert bytes(unwrapped.children[0].data) == payload
    assert imports(unwrapped.children[0].data) == ["os.system"]


def test_tar_gz_is_a_gzip_wrapping_a_tar(marker: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("x.pkl")
        payload = exec_payload(marker)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    outer = compressed.read(memoryview(buf.getvalue()), make_ctx())
    tar = outer.children[0]
    assert archives.sniff(tar.data) and not archives.sniff(memoryview(buf.getvalue()))
    result = archives.read(tar.data, make_ctx(encoding=tar.encoding, file_offset=None))
    assert [bytes(c.data) for c in result.children] == [payload]
    assert result.children[0].encoding == ("gzip",)
    assert result.children[0].file_offset is None


@pytest.mark.parametrize("name", sorted(foreign_samples()))
def test_sniff_does_not_claim_other_formats(name: str) -> None:
    assert archives.sniff(memoryview(foreign_samples()[name])) is (name == "tar")


def test_links_and_devices_are_reported_not_read(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("data.pkl")
        info.size = len(BENIGN)
        tf.addfile(info, io.BytesIO(BENIGN))
        for name, kind in [
            ("sym.pkl", tarfile.SYMTYPE),
            ("hard.pkl", tarfile.LNKTYPE),
            ("dev", tarfile.CHRTYPE),
        ]:
            link = tarfile.TarInfo(name)
            link.type = kind
            link.linkname = "data.pkl" if kind != tarfile.CHRTYPE else ""
            tf.addfile(link)
        directory = tarfile.TarInfo("sub")
        directory.type = tarfile.DIRTYPE
        tf.addfile(directory)
    result = archives.read(memoryview(buf.getvalue()), make_ctx())
    assert sorted(codes(result)) == ["SL310"] * 3
    assert {f.member for f in result.findings} == {"sym.pkl", "hard.pkl", "dev"}
    assert [c.name for c in result.children] == ["data.pkl"]
    assert all(f.effect.value == "none" for f in result.findings)


def test_duplicate_tar_names_are_all_scanned_and_reported(marker: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for data in (BENIGN, exec_payload(marker)):
            info = tarfile.TarInfo("pickle")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    result = archives.read(memoryview(buf.getvalue()), make_ctx())
    assert codes(result) == ["SL303"]
    assert [bytes(c.data) for c in result.children] == [BENIGN, exec_payload(marker)]


def test_member_limit_stops_with_a_finding() -> None:
    data = tar_bytes({f"m{i}": b"x" for i in range(5)})
    result = archives.read(memoryview(data), make_ctx(Limits(max_zip_members=3)))
    assert codes(result) == ["SL203"]
    assert len(result.children) == 3


def test_payload_appended_after_the_tar_end_is_handed_on(marker: Path) -> None:
    payload = exec_payload(marker)
    data = tar_bytes({"a.pkl": BENIGN}) + payload
    result = archives.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL205"]
    tail = result.children[-1]
    assert tail.name == "<after-tar>"
    assert bytes(tail.data) == payload


def test_a_header_tarfile_cannot_parse_does_not_hide_what_follows(marker: Path) -> None:
    first = tar_bytes({"a.pkl": BENIGN})
    second = tar_bytes({"b.pkl": exec_payload(marker)})
    # Cut the first archive's end-of-archive blocks and break the next header's checksum:
    # tarfile then stops quietly, as if the archive had ended.
    body = first[: 512 + 512 * ((len(BENIGN) + 511) // 512)]
    broken = bytearray(second)
    broken[148:156] = b"0000000\0"
    result = archives.read(memoryview(body + bytes(broken)), make_ctx())
    assert "SL205" in codes(result)
    assert bytes(result.children[0].data) == BENIGN
    assert exec_payload(marker) in bytes(result.children[-1].data)


def test_tar_checksum_quick_refusal_changes_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real header, its checksum field then spelled every way int() reads octal, and filled with
    # random bytes: the quick refusal of fields int() cannot read must agree everywhere.
    header = bytearray(tarfile.TarInfo("model/weights.pkl").tobuf(format=tarfile.USTAR_FORMAT)[:512])
    total = sum(header[:148]) + 8 * 0x20 + sum(header[156:512])
    digits = f"{total:o}"
    assert len(digits) <= 5  # room in the 8-byte field for each spelling below
    spellings = [f"{total:06o}\0 ", f" {digits} ", f"0o{digits}", f"0O{digits}", f"+{digits}\t"]
    spellings += [f"0o_{digits}", f"{digits[:2]}_{digits[2:]}", f"\x0b{digits}\x0c", f"\t {digits}"]
    valid = [spelling.encode("ascii").ljust(8, b"\0") for spelling in spellings]
    rng = random.Random(7)
    alphabet = b"\t\n\x0b\x0c\r +-01234567O_o\0" + b"89aAxX\x1c\x80\xff"
    randoms = [bytes(rng.choice(alphabet) for _ in range(8)) for _ in range(5000)]
    fields = valid + [f"-{digits}".encode().ljust(8, b"\0")] + randoms
    blocks = [memoryview(bytes(header[:148]) + field + bytes(header[156:])) for field in fields]
    with monkeypatch.context() as m:
        m.setattr(archives, "_OCTAL_FIELD", bytes(range(256)))  # no quick refusal: int() decides
        expected = [archives.is_tar(block) for block in blocks]
    assert all(expected[: len(valid)]) and not all(expected)
    assert [archives.is_tar(block) for block in blocks] == expected


def test_truncated_member_hands_on_its_prefix() -> None:
    data = tar_bytes({"a.pkl": BENIGN * 20})
    cut = 512 + 300
    result = archives.read(memoryview(data[:cut]), make_ctx())
    assert "SL205" in codes(result)
    assert bytes(result.children[0].data) == (BENIGN * 20)[:300]


def test_tar_truncations_and_flips_never_raise() -> None:
    data = tar_bytes({"a.pkl": BENIGN, "b/c.bin": bytes(range(256)) * 8})
    for cut in range(0, len(data), 97):
        buf = memoryview(data[:cut])
        if archives.sniff(buf):
            archives.read(buf, make_ctx())
    rng = random.Random(7)
    for _ in range(200):
        flipped = bytearray(data)
        for _ in range(3):
            flipped[rng.randrange(3 * 512)] = rng.randrange(256)
        buf = memoryview(bytes(flipped))
        if archives.sniff(buf):
            result = archives.read(buf, make_ctx())
            assert all(c.data.nbytes <= len(flipped) for c in result.children)


# -- 7z -------------------------------------------------------------------------------------------


def test_7z_members_are_children_charged_to_the_budget(marker: Path) -> None:
    payload = exec_payload(marker)
    data = sevenz_bytes({"model/data.pkl": payload, "notes.txt": b"benign"})
    buf = memoryview(data)
    assert archives.sniff(buf)
    ctx = make_ctx(encoding=("outer",))
    result = archives.read(buf, ctx)
    assert result.format == "7z"
    assert codes(result) == []
    by_name = {c.name: c for c in result.children}
    assert bytes(by_name["model/data.pkl"].data) == payload
    assert imports(by_name["model/data.pkl"].data) == ["builtins.exec"]
    assert by_name["model/data.pkl"].encoding == ("outer", "7z")
    assert ctx.budget.used == len(payload) + len(b"benign")


@pytest.mark.parametrize(
    "filters",
    [
        [{"id": py7zr.FILTER_LZMA2}],
        [{"id": py7zr.FILTER_BZIP2}],
        [{"id": py7zr.FILTER_DEFLATE}],
        [{"id": py7zr.FILTER_COPY}],
        [{"id": py7zr.FILTER_X86}, {"id": py7zr.FILTER_LZMA}],
    ],
)
def test_7z_filters_py7zr_supports(filters: list[dict[str, int]], marker: Path) -> None:
    payload = exec_payload(marker)
    result = archives.read(memoryview(sevenz_bytes({"m.pkl": payload}, filters=filters)), make_ctx())
    assert codes(result) == []
    assert [bytes(c.data) for c in result.children] == [payload]


@pytest.mark.parametrize("header_encryption", [False, True])
def test_encrypted_7z_is_unscannable(header_encryption: bool, marker: Path) -> None:
    data = sevenz_bytes(
        {"m.pkl": exec_payload(marker)}, password="secret", header_encryption=header_encryption
    )
    result = archives.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL205"]
    assert result.children == []


def _patch_7z_header(data: bytes, old: bytes, new: bytes) -> bytes:
    """Rewrite bytes in an unencoded 7z header and fix both CRCs, so only the content is wrong."""
    next_offset, next_size, _ = struct.unpack_from("<QQI", data, 12)
    start = 32 + next_offset
    header = data[start : start + next_size]
    assert header.count(old) == 1
    header = header.replace(old, new)
    fixed = bytearray(data[:start] + header + data[start + next_size :])
    struct.pack_into("<I", fixed, 28, zlib.crc32(header))
    struct.pack_into("<I", fixed, 8, zlib.crc32(bytes(fixed[12:32])))
    return bytes(fixed)


def test_7z_with_an_unsupported_filter_is_unscannable(marker: Path) -> None:
    buf = io.BytesIO()
    archive = py7zr.SevenZipFile(buf, "w", filters=[{"id": py7zr.FILTER_COPY}])
    archive.encoded_header_mode = False
    archive.writestr(exec_payload(marker), "m.pkl")
    archive.close()
    # Folder with one coder whose 1-byte method id is COPY (0x00) -> an id no reader knows.
    data = _patch_7z_header(buf.getvalue(), b"\x0b\x01\x00\x01\x01\x00", b"\x0b\x01\x00\x01\x01\x7f")
    result = archives.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL205"]
    assert "Unsupported" in result.findings[0].message or "unsupported" in result.findings[0].message


def test_7z_without_py7zr_is_unscannable(monkeypatch: pytest.MonkeyPatch, marker: Path) -> None:
    data = sevenz_bytes({"m.pkl": exec_payload(marker)})
    monkeypatch.setitem(sys.modules, "py7zr", None)
    result = archives.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL208"]
    assert "py7zr" in result.findings[0].message


def test_7z_bomb_stops_at_the_budget() -> None:
    data = sevenz_bytes({"zeros.bin": bytes(8 << 20)})
    assert len(data) < 64 << 10
    ctx = make_ctx(Limits(max_decompressed_bytes=1 << 20))
    result = archives.read(memoryview(data), ctx)
    assert codes(result) == ["SL203"]
    assert ctx.budget.used <= 1 << 20


def test_7z_bomb_stops_on_the_ratio() -> None:
    data = sevenz_bytes({"zeros.bin": bytes(20 << 20)})
    ctx = make_ctx()
    result = archives.read(memoryview(data), ctx)
    assert codes(result) == ["SL309"]
    assert ctx.budget.used < 20 << 20


def test_7z_member_limit() -> None:
    data = sevenz_bytes({f"m{i}": b"x" for i in range(4)})
    result = archives.read(memoryview(data), make_ctx(Limits(max_zip_members=2)))
    assert codes(result) == ["SL203"]
    assert result.children == []


def test_7z_duplicates_are_all_scanned(marker: Path) -> None:
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as z:
        z.writestr(BENIGN, "a.pkl")
        z.writestr(exec_payload(marker), "a.pkl")
    data = buf.getvalue()
    result = archives.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL303"]
    assert sorted(bytes(c.data) for c in result.children) == sorted([BENIGN, exec_payload(marker)])


def test_7z_symlink_is_reported_not_read(tmp_path: Path) -> None:
    target = tmp_path / "data.pkl"
    target.write_bytes(BENIGN)
    (tmp_path / "link.pkl").symlink_to("data.pkl")
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", dereference=False) as z:
        z.write(target, "data.pkl")
        z.write(tmp_path / "link.pkl", "link.pkl")
    result = archives.read(memoryview(buf.getvalue()), make_ctx())
    assert codes(result) == ["SL310"]
    assert [c.name for c in result.children] == ["data.pkl"]


def test_7z_truncations_and_flips_never_raise_and_never_pass_clean() -> None:
    data = sevenz_bytes({"a.pkl": BENIGN, "b.bin": bytes(range(256)) * 4})
    for cut in range(6, len(data), max(1, len(data) // 40)):
        result = archives.read(memoryview(data[:cut]), make_ctx())
        assert "SL205" in codes(result), cut
    rng = random.Random(3)
    for _ in range(60):
        flipped = bytearray(data)
        pos = rng.randrange(6, len(flipped))
        flipped[pos] ^= 1 << rng.randrange(8)
        result = archives.read(memoryview(bytes(flipped)), make_ctx())
        got = {c.name: bytes(c.data) for c in result.children}
        if got != {"a.pkl": BENIGN, "b.bin": bytes(range(256)) * 4}:
            assert "SL205" in codes(result), pos
