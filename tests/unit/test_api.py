"""The public API's contract: reports, errors with full context, fail-closed orchestration."""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest

import safeload
from safeload import api
from safeload.errors import (
    DisallowedGlobalError,
    MalformedPickleError,
    SafeloadError,
    ScanError,
    UnsafeModelError,
)
from safeload.model import Verdict
from tests.pickle_builder import call, exec_payload, glob, system_payload, unicode, wrap


def test_scan_safe_and_hash_on_request(tmp_path: Path) -> None:
    data = pickle.dumps(OrderedDict(a=1, b=[1.5, None, True]), protocol=5)
    f = tmp_path / "ok.pkl"
    f.write_bytes(data)
    report = safeload.scan(f, policy="strict")
    assert report.verdict is Verdict.SAFE
    assert report.sha256 is None  # hashing skipped: no waivers, not asked
    assert report.size == len(data)
    assert "collections.OrderedDict" in report.globals
    hashed = safeload.scan(f, policy="strict", sha256=True)
    assert hashed.sha256 == hashlib.sha256(data).hexdigest()
    assert safeload.scan_bytes(data, policy="strict").sha256 == hashed.sha256


def test_floor_refusal_has_no_remedy(marker: Path) -> None:
    report = safeload.scan_bytes(system_payload(marker), name="evil.pkl")
    assert report.verdict is Verdict.UNSAFE
    floor = [f for f in report.findings if f.code == "SL100"]
    assert floor and floor[0].global_name == "os.system" and floor[0].remedy is None


def test_load_refusal_names_file_member_offset_global_and_remedy(tmp_path: Path, marker: Path) -> None:
    data = wrap(call(glob("mypkg.layers", "Scale"), unicode("x")), 2)
    f = tmp_path / "model.bin"
    f.write_bytes(data)
    with pytest.raises(DisallowedGlobalError) as info:
        safeload.load(f)
    err = info.value
    assert isinstance(err, pickle.UnpicklingError) and isinstance(err, UnsafeModelError)
    text = str(err)
    assert str(f) in text and "offset 2" in text and "mypkg.layers.Scale" in text
    assert "[[allow]]" in text and 'global = "mypkg.layers.Scale"' in text
    assert err.global_name == "mypkg.layers.Scale" and err.offset == 2 and not err.on_floor
    assert err.report is not None and err.report.verdict is Verdict.UNSAFE


def test_load_refuses_floor_and_never_runs_payload(tmp_path: Path, marker: Path) -> None:
    for protocol in range(6):
        with pytest.raises(UnsafeModelError) as info:
            safeload.loads(exec_payload(marker, protocol))
        assert info.value.on_floor  # type: ignore[attr-defined]


def test_load_of_broken_stream_is_a_scan_error(marker: Path) -> None:
    broken = pickle.dumps({"a": 1}, protocol=2)[:-3]
    with pytest.raises(MalformedPickleError):
        safeload.loads(broken)
    assert safeload.scan_bytes(broken).verdict is Verdict.UNSCANNABLE


def test_payload_before_broken_tail_is_unsafe_not_just_unscannable(marker: Path) -> None:
    data = system_payload(marker)[:-1] + b"\xff\xfe"  # drop STOP, add garbage
    report = safeload.scan_bytes(data)
    assert report.verdict is Verdict.UNSAFE
    assert any(f.global_name == "os.system" for f in report.findings)


def test_file_object_and_mmap_rules(tmp_path: Path) -> None:
    data = pickle.dumps([1, 2, 3], protocol=4)
    assert safeload.load(io.BytesIO(data)) == [1, 2, 3]
    with pytest.raises(ScanError):
        safeload.load(io.BytesIO(data), mmap=True)
    with pytest.raises(TypeError):
        safeload.load(io.BytesIO(data), pickle_module=pickle)


def test_scan_of_a_file_object_reads_it_from_where_it_stands(tmp_path: Path, marker: Path) -> None:
    evil = system_payload(marker)
    f = tmp_path / "upload.bin"
    f.write_bytes(b"HEAD" + evil)
    by_path = safeload.scan_bytes(evil, name=str(f))
    with open(f, "rb") as handle:
        handle.seek(4)
        report = safeload.scan(handle, sha256=True)
    assert report.verdict is Verdict.UNSAFE and report.path == str(f)
    assert report.globals == by_path.globals and "os.system" in report.globals
    assert [x.code for x in report.findings] == [x.code for x in by_path.findings]
    assert report.sha256 == hashlib.sha256(evil).hexdigest() and report.size == len(evil)
    benign = safeload.scan(io.BytesIO(pickle.dumps({"a": [1, 2]})), policy="strict")
    assert benign.verdict is Verdict.SAFE and benign.path == "<BytesIO>"


def test_scan_of_an_unreadable_file_object_is_a_report_not_a_crash(tmp_path: Path) -> None:
    text = io.StringIO("not bytes")
    report = safeload.scan(text)  # type: ignore[arg-type]
    assert report.verdict is Verdict.UNSCANNABLE and report.findings[0].code == "SL206"
    assert "binary mode" in report.findings[0].message
    policy = tmp_path / "tiny.toml"
    policy.write_text(
        'schema_version = 1\nname = "tiny"\ndescription = "d"\nextends = ["strict"]\n[limits]\nmax_file_bytes = 10\n'
    )
    big = safeload.scan(io.BytesIO(pickle.dumps(list(range(100)))), policy=str(policy))
    assert big.verdict is Verdict.UNSCANNABLE and big.findings[0].code == "SL203"


def test_internal_error_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("walker bug")

    monkeypatch.setattr(api, "walk", boom)
    report = safeload.scan_bytes(pickle.dumps(1))
    assert report.verdict is Verdict.UNSCANNABLE
    assert [f.code for f in report.findings] == ["SL207"]
    with pytest.raises(SafeloadError):
        safeload.loads(pickle.dumps(1))


def test_missing_and_oversized_inputs(tmp_path: Path) -> None:
    report = safeload.scan(tmp_path / "missing.pt")
    assert report.verdict is Verdict.UNSCANNABLE
    policy = tmp_path / "tiny.toml"
    policy.write_text(
        'schema_version = 1\nname = "tiny"\ndescription = "d"\nextends = ["strict"]\n[limits]\nmax_file_bytes = 10\n'
    )
    f = tmp_path / "big.pkl"
    f.write_bytes(pickle.dumps(list(range(100))))
    report = safeload.scan(f, policy=str(policy))
    assert report.verdict is Verdict.UNSCANNABLE and report.findings[0].code == "SL203"


def test_waiver_marks_finding_waived(tmp_path: Path) -> None:
    data = wrap(call(glob("mypkg.layers", "Scale"), unicode("x")), 2)
    digest = hashlib.sha256(data).hexdigest()
    policy = tmp_path / "waive.toml"
    policy.write_text(
        'schema_version = 1\nname = "w"\ndescription = "d"\nextends = ["default"]\n'
        f'[[waive]]\nsha256 = "{digest}"\ncode = "SL101"\nglobal = "mypkg.layers.Scale"\n'
        'reason = "reviewed by the model team"\nexpires = 2099-01-01\n'
    )
    report = safeload.scan_bytes(data, policy=str(policy))
    assert report.verdict is Verdict.SAFE
    waived = [f for f in report.findings if f.waived]
    assert waived and waived[0].waiver_reason == "reviewed by the model team"
    assert safeload.scan_bytes(data[:-1] + b"\x85.", policy=str(policy)).verdict is not Verdict.SAFE


def test_report_versions_match_installed_metadata() -> None:
    from importlib import metadata

    from safeload.versions import installed_version as _installed_version

    for dist in ("numpy", "pydantic", "fickling", "msgspec", "typing-extensions", "typing_extensions"):
        assert _installed_version(dist) == metadata.version(dist)
    assert _installed_version("no-such-distribution-safeload-test") is None


def test_report_versions_are_found_without_importing_importlib_metadata() -> None:
    # importlib.metadata imports the email package: 28 ms of every scan's start, for three names.
    code = (
        "import sys; from safeload.versions import versions; v = dict(versions()); "
        "import platform; assert v['python'] == platform.python_version(), v; "
        "assert 'fickling' in v and 'numpy' in v, v; "
        "assert 'importlib.metadata' not in sys.modules and 'email' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _metadata_folder(root: Path, folder: str, header: str) -> None:
    (root / folder).mkdir(parents=True)
    (root / folder / header).write_text("Metadata-Version: 2.1\nName: X\nVersion: 7.8.9\n\nVersion: 0\n")


@pytest.mark.parametrize(
    ("folder", "header"),
    [("Fake.Dist_Pkg-7.8.9.dist-info", "METADATA"), ("fake_dist_pkg-7.8.9-py3.11.egg-info", "PKG-INFO")],
)
def test_installed_version_reads_a_metadata_folder_on_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str, header: str
) -> None:
    from importlib import metadata

    from safeload.versions import installed_version

    _metadata_folder(tmp_path, folder, header)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_version("fake-dist-pkg") == "7.8.9" == metadata.version("fake-dist-pkg")


def test_installed_version_leaves_a_zip_on_sys_path_to_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safeload.versions import installed_version

    archive = tmp_path / "dists.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(
            "zipped_dist-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: zipped-dist\nVersion: 1.0\n"
        )
    monkeypatch.syspath_prepend(str(archive))
    assert installed_version("zipped-dist") == "1.0"
    assert installed_version("numpy") is not None
