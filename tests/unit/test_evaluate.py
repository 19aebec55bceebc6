"""Walker output + policy -> findings and GlobalUse rows."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest

from safeload.analysis.evaluate import MAX_PER_KIND, evaluate_stream
from safeload.analysis.walker import walk
from safeload.formats.base import PersistentScheme
from safeload.model import Finding, GlobalUse, Use
from safeload.policy import load_policy
from tests import pickle_builder as pb

STRICT = load_policy("strict")


def evaluate(
    data: bytes,
    scheme: PersistentScheme = PersistentScheme.NONE,
    *,
    member: str | None = None,
    file_offset: int | None = None,
    multi: bool = True,
) -> tuple[list[Finding], list[GlobalUse]]:
    findings, imports = evaluate_stream(
        walk(data, multi=multi),
        policy=STRICT,
        member=member,
        file_offset=file_offset,
        persistent_scheme=scheme,
    )
    return findings, imports.rows()


def by_code(findings: list[Finding], code: str) -> list[Finding]:
    return [f for f in findings if f.code == code]


def test_floor_hit_has_no_remedy(marker: Path) -> None:
    findings, rows = evaluate(pb.exec_payload(marker), member="archive/data.pkl", file_offset=1000)
    (hit,) = findings
    assert hit.code == "SL100" and hit.remedy is None
    assert hit.global_name == "builtins.exec" and hit.uses == (Use.REFERENCED, Use.CALLED)
    assert "very likely malicious" in hit.message
    assert hit.member == "archive/data.pkl" and hit.offset == 2 and hit.file_offset == 1002
    (row,) = rows
    assert (row.name, row.opcode, row.allowed, row.offset) == ("builtins.exec", "GLOBAL", False, 2)


def test_not_allowed_has_the_policy_remedy() -> None:
    data = pb.wrap(pb.glob("mypkg.layers", "Scale") + pb.EMPTY_TUPLE + pb.NEWOBJ, 2)
    (finding,) = evaluate(data)[0]
    assert finding.code == "SL101" and finding.global_name == "mypkg.layers.Scale"
    assert finding.remedy == STRICT.remedy("mypkg.layers.Scale") and "mypkg.layers.Scale" in finding.remedy
    assert Use.INSTANTIATED in finding.uses and finding.file_offset is None


def test_every_import_is_checked_whatever_its_use() -> None:
    # Only referenced (stored in a list), never called: still refused.
    data = pb.wrap(pb.EMPTY_LIST + pb.glob("os", "system") + pb.APPEND, 2)
    (finding,) = evaluate(data)[0]
    assert finding.code == "SL100" and finding.uses == (Use.REFERENCED,)


def test_allowed_imports_give_rows_not_findings() -> None:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2).state_dict(), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    findings, rows = evaluate(data, PersistentScheme.TORCH_ZIP, multi=False)
    assert findings == []
    assert {r.name for r in rows} == {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
    }
    assert all(r.allowed for r in rows)


def test_one_finding_per_global_with_all_sites() -> None:
    body = pb.glob("os", "system") + pb.POP + pb.glob("os", "system") + pb.POP + pb.NONE
    findings, rows = evaluate(pb.wrap(body, 2))
    (finding,) = findings
    assert "2 sites" in finding.message and len(rows) == 2


def test_python2_name_is_judged_by_its_mapped_name() -> None:
    (finding,) = evaluate(pb.wrap(pb.glob("__builtin__", "eval"), 2))[0]
    assert finding.code == "SL100" and finding.global_name == "builtins.eval"
    assert "__builtin__.eval" in finding.message


def test_anomalies_become_findings() -> None:
    data = pb.wrap(pb.binint(1) + pb.unicode("x") + pb.STACK_GLOBAL, 4)
    findings, _ = evaluate(data, file_offset=10)
    (dynamic,) = findings
    assert (
        dynamic.code == "SL102" and dynamic.offset is not None and dynamic.file_offset == dynamic.offset + 10
    )
    assert dynamic.global_name == "?.x"


def test_names_are_raw_in_the_model_and_escaped_when_printed() -> None:
    data = pb.wrap(pb.glob("os\x1b[31m", "system\r"), 2)
    (finding,) = evaluate(data)[0]
    assert finding.global_name == "os\x1b[31m.system\r"
    assert "\x1b" not in finding.render() and "\\x1b" in finding.render()


# -- persistent ids ---------------------------------------------------------------------------------


def pid(*items: bytes) -> bytes:
    return pb.wrap(pb.MARK + b"".join(items) + pb.TUPLE + b"Q", 2)


ZIP_OK = pid(
    pb.unicode("storage"), pb.glob("torch", "FloatStorage"), pb.unicode("0"), pb.unicode("cpu"), pb.binint(4)
)
LEGACY_OK = pid(
    pb.unicode("storage"),
    pb.glob("torch", "FloatStorage"),
    pb.unicode("139"),
    pb.unicode("cuda:0"),
    pb.binint(4),
    pb.NONE,
)
LEGACY_VIEW = pid(
    pb.unicode("storage"),
    pb.glob("torch", "FloatStorage"),
    pb.unicode("139"),
    pb.unicode("cpu"),
    pb.binint(4),
    pb.tup(pb.unicode("140"), pb.binint(0), pb.binint(2)),
)
LEGACY_MODULE = pid(
    pb.unicode("module"), pb.glob("torch.nn", "Linear"), pb.unicode("f.py"), pb.unicode("src")
)


@pytest.mark.parametrize(
    ("scheme", "data", "ok"),
    [
        (PersistentScheme.NONE, ZIP_OK, False),
        (PersistentScheme.NONE, b"Pkey\n.", False),
        (PersistentScheme.TORCH_ZIP, ZIP_OK, True),
        (PersistentScheme.TORCH_ZIP, LEGACY_OK, False),
        (PersistentScheme.TORCH_ZIP, b"Pkey\n.", False),
        (
            PersistentScheme.TORCH_ZIP,
            pid(
                pb.unicode("storage"),
                pb.glob("os", "system"),
                pb.unicode("0"),
                pb.unicode("cpu"),
                pb.binint(1),
            ),
            False,
        ),
        (
            PersistentScheme.TORCH_ZIP,
            pid(
                pb.unicode("storage"),
                pb.glob("torch", "FloatStorage"),
                pb.binint(0),
                pb.unicode("cpu"),
                pb.binint(1),
            ),
            False,
        ),
        (
            PersistentScheme.TORCH_ZIP,
            pid(
                pb.unicode("storage"),
                pb.glob("torch", "FloatStorage"),
                pb.unicode("0"),
                pb.unicode("cpu"),
                pb.call(pb.glob("m", "f")),
            ),
            False,
        ),
        (PersistentScheme.TORCH_LEGACY, LEGACY_OK, True),
        (PersistentScheme.TORCH_LEGACY, LEGACY_VIEW, True),
        (PersistentScheme.TORCH_LEGACY, LEGACY_MODULE, True),
        (PersistentScheme.TORCH_LEGACY, ZIP_OK, False),
        (PersistentScheme.TORCH_LEGACY_TAR, b"P139\n.", True),
        (PersistentScheme.TORCH_LEGACY_TAR, b"P../etc\n.", False),
        (
            PersistentScheme.TORCH_LEGACY_TAR,
            pid(pb.glob("torch.nn", "Linear"), pb.NONE, pb.NONE),
            True,
        ),
    ],
)
def test_persistent_id_schemes(scheme: PersistentScheme, data: bytes, ok: bool) -> None:
    findings, _ = evaluate(data, scheme)
    sl106 = by_code(findings, "SL106")
    assert (sl106 == []) == ok, [f.message for f in sl106]


def test_persistent_id_storage_type_is_also_a_policy_import() -> None:
    findings, rows = evaluate(
        pid(pb.unicode("storage"), pb.glob("os", "system"), pb.unicode("0"), pb.unicode("cpu"), pb.binint(1)),
        PersistentScheme.TORCH_ZIP,
    )
    assert {f.code for f in findings} == {"SL100", "SL106"}
    (row,) = rows
    assert Use.PERSISTENT_ID in row.uses


def test_many_bad_persistent_ids_are_summarised() -> None:
    body = pb.EMPTY_LIST + (pb.unicode("x") + b"Q" + pb.APPEND) * (MAX_PER_KIND + 30)
    findings, _ = evaluate(pb.wrap(body, 2))
    sl106 = by_code(findings, "SL106")
    assert len(sl106) == MAX_PER_KIND + 1 and "30 more" in sl106[-1].message


def test_plain_pickles_are_clean_under_strict() -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(
            {"a": [1, 2.0, "x", (None, True)], "b": b"raw" if protocol >= 3 else "s"}, protocol
        )
        findings, rows = evaluate(data)
        assert findings == [] and rows == []


def test_real_torch_persistent_ids_fit_the_zip_scheme() -> None:
    torch = pytest.importorskip("torch")
    obj = {
        "untyped": torch.UntypedStorage(4),
        "typed": [torch.ones(2, dtype=d) for d in (torch.float16, torch.bfloat16, torch.int8, torch.bool)],
    }
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    findings, _ = evaluate(data, PersistentScheme.TORCH_ZIP, multi=False)
    assert by_code(findings, "SL106") == []
