"""THREATS.md §2: making the name hard to see. Each trick is resolved or flagged, never guessed."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import safeload
from safeload.analysis.walker import walk
from safeload.errors import SafeloadError
from safeload.model import Use, Verdict
from tests import pickle_builder as pb


def scan_codes(data: bytes, policy: str = "default") -> dict[str, set[str | None]]:
    report = safeload.scan_bytes(data, policy=policy)
    assert report.verdict is Verdict.UNSAFE
    with pytest.raises(SafeloadError):
        safeload.loads(data, policy=policy)
    out: dict[str, set[str | None]] = {}
    for f in report.findings:
        out.setdefault(f.code, set()).add(f.global_name)
    return out


def touch(marker: Path) -> bytes:
    return pb.unicode(f"touch {marker}")


# -- STACK_GLOBAL operands -----------------------------------------------------------------------


def memo_stack_global(marker: Path) -> bytes:
    # picklescan #22: operands stored in the memo and fetched back, with a decoy string between.
    body = pb.unicode("os") + pb.MEMOIZE + pb.POP + pb.unicode("system") + pb.MEMOIZE + pb.POP
    body += pb.unicode("collections") + pb.POP + b"h\x00h\x01" + pb.STACK_GLOBAL
    return pb.wrap(body + pb.tup(touch(marker)) + pb.REDUCE, 4)


def test_stack_global_from_memo(marker: Path, tmp_path: Path) -> None:
    assert "os.system" in scan_codes(memo_stack_global(marker))["SL100"]
    proof = tmp_path / "LIVE"
    pb.real_load_in_subprocess(memo_stack_global(proof), tmp_path)
    assert proof.exists()


@pytest.mark.parametrize(
    "module_ops",
    [
        pb.binint(0),
        b"C\x02os",  # bytes, not str
        b"\x8c\x02os\x85",  # a tuple holding the name
        pb.call(pb.glob("collections", "OrderedDict")),  # an allowed call's result
        b"\x97",  # an out-of-band buffer
    ],
    ids=["int", "bytes", "tuple", "call-result", "buffer"],
)
def test_stack_global_type_confusion(module_ops: bytes, marker: Path) -> None:
    data = pb.wrap(module_ops + pb.unicode("system") + pb.STACK_GLOBAL + pb.tup(touch(marker)) + pb.REDUCE, 5)
    found = scan_codes(data)
    assert "?.system" in found["SL102"]


# -- dotted names, Python 2 names, extension codes -----------------------------------------------


@pytest.mark.parametrize(
    ("module", "name"),
    [("shutil", "os.system"), ("torch.serialization", "os.system"), ("collections", "abc.sys.modules")],
)
def test_dotted_name_through_an_innocent_module(module: str, name: str, marker: Path) -> None:
    data = pb.wrap(pb.stack_global(module, name) + pb.tup(touch(marker)) + pb.REDUCE, 4)
    result = walk(data)
    (site,) = result.imports
    assert (site.module, site.name) == (module, name)  # the exact path, never its module alone
    found = scan_codes(data)
    assert f"{module}.{name}" in found.get("SL100", set()) | found.get("SL101", set())


def test_dotted_name_is_live(tmp_path: Path) -> None:
    proof = tmp_path / "LIVE"
    data = pb.wrap(pb.stack_global("shutil", "os.system") + pb.tup(touch(proof)) + pb.REDUCE, 4)
    pb.real_load_in_subprocess(data, tmp_path)
    assert proof.exists()


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_python2_names(protocol: int, marker: Path, tmp_path: Path) -> None:
    def evil(m: Path) -> bytes:
        code = pb.marker_code(m)
        arg = pb.string0(code) if protocol == 0 else pb.unicode(code)
        return pb.wrap(pb.call(pb.glob("__builtin__", "eval"), arg), protocol)

    assert "builtins.eval" in scan_codes(evil(marker))["SL100"]
    proof = tmp_path / "LIVE"
    pb.real_load_in_subprocess(evil(proof), tmp_path)
    assert proof.exists()
    copy_reg = pb.wrap(
        pb.glob("copy_reg", "_reconstructor") + pb.POP + pb.glob("commands", "getoutput"), protocol
    )
    assert "subprocess.getoutput" in scan_codes(copy_reg)["SL100"]


@pytest.mark.parametrize(
    "ext", [b"\x82\x01", b"\x83\x01\x02", b"\x84" + struct.pack("<i", 123456)], ids=["EXT1", "EXT2", "EXT4"]
)
def test_extension_codes(ext: bytes, marker: Path) -> None:
    data = pb.wrap(ext + pb.tup(touch(marker)) + pb.REDUCE, 2)
    assert "SL103" in scan_codes(data)


# -- what an allowed call receives, and what BUILD sets ---------------------------------------------


def rebuild_from_type(marker: Path) -> bytes:
    # torch._tensor._rebuild_from_type_v2(func, new_type, args, state) calls func(*args).
    args = pb.tup(pb.unicode(pb.marker_code(marker)))
    return pb.wrap(
        pb.call(
            pb.glob("torch._tensor", "_rebuild_from_type_v2"),
            pb.glob("builtins", "exec"),
            pb.glob("torch", "Tensor"),
            args,
            pb.EMPTY_DICT,
        ),
        2,
    )


def test_dangerous_callable_as_argument_of_an_allowed_one(marker: Path) -> None:
    found = scan_codes(rebuild_from_type(marker), policy="strict")
    assert "builtins.exec" in found["SL100"]
    report = safeload.scan_bytes(rebuild_from_type(marker), policy="strict")
    (hit,) = [f for f in report.findings if f.global_name == "builtins.exec"]
    assert Use.ARGUMENT in hit.uses and Use.CALLED not in hit.uses


@pytest.mark.slow
def test_dangerous_callable_as_argument_is_live(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    proof = tmp_path / "LIVE"
    result = pb.real_load_in_subprocess(rebuild_from_type(proof), tmp_path, timeout=300)
    assert proof.exists(), result.stderr[-500:]


def setstate_via_build(marker: Path) -> bytes:
    """GHSA-6ggj-6f2q-f7mx style: BUILD puts __setstate__ on an instance, a second BUILD calls it."""
    obj = pb.glob("argparse", "Namespace") + pb.EMPTY_TUPLE + pb.REDUCE
    first = pb.EMPTY_DICT + pb.unicode("__setstate__") + pb.glob("builtins", "exec") + pb.SETITEM + pb.BUILD
    second = pb.unicode(pb.marker_code(marker)) + pb.BUILD
    return pb.wrap(obj + first + second, 2)


def test_setstate_planted_by_build(marker: Path, tmp_path: Path) -> None:
    found = scan_codes(setstate_via_build(marker))
    assert "SL104" in found and "builtins.exec" in found["SL100"]
    proof = tmp_path / "LIVE"
    pb.real_load_in_subprocess(setstate_via_build(proof), tmp_path)
    assert proof.exists()


def test_build_on_a_class_object(marker: Path) -> None:
    data = pb.wrap(
        pb.glob("collections", "OrderedDict")
        + pb.tup(pb.NONE, pb.EMPTY_DICT + pb.unicode("__eq__") + pb.glob("os", "system") + pb.SETITEM)
        + pb.BUILD,
        2,
    )
    assert "SL104" in scan_codes(data)
