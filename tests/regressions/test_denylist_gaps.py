"""THREATS.md §1: callables a denylist forgot. Only an allowlist ends this; each one is refused.

Every fixture calls the named callable through GLOBAL + REDUCE with a harmless argument. Some are
proven live: the same bytes (with another marker path) run under the real ``pickle`` in a child
process create their marker, while safeload never does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import safeload
from safeload.errors import SafeloadError
from safeload.model import Verdict
from tests import pickle_builder as pb

# (module, name) pairs from CVEs, advisories and the "Art of Hide and Seek" gadget list.
GADGETS = [
    ("runpy", "_run_code"),
    ("runpy", "run_path"),
    ("pydoc", "pipepager"),
    ("timeit", "timeit"),
    ("cProfile", "run"),
    ("profile", "run"),
    ("pkgutil", "resolve_name"),
    ("operator", "attrgetter"),
    ("operator", "methodcaller"),
    ("functools", "partial"),
    ("functools", "reduce"),
    ("pip", "main"),
    ("ensurepip", "_run_pip"),
    ("importlib", "import_module"),
    ("inspect", "getattr_static"),
    ("uuid", "_get_command_stdout"),
    ("_osx_support", "_read_output"),
    ("imaplib", "IMAP4_stream"),
    ("trace", "Trace.run"),
    ("bdb", "Bdb.run"),
    ("code", "InteractiveInterpreter.runsource"),
    ("doctest", "debug_script"),
    ("idlelib.pyshell", "ModifiedInterpreter.runcode"),
    ("pickle", "loads"),
    ("_pickle", "loads"),
    ("marshal", "loads"),
    ("numpy", "load"),
    ("joblib", "load"),
    ("torch", "load"),
    ("torch.storage", "_load_from_bytes"),
    ("_io", "FileIO"),
    ("shutil", "rmtree"),
    ("urllib.request", "urlopen"),
    ("webbrowser", "open"),
    ("ctypes", "CDLL"),
    ("_posixsubprocess", "fork_exec"),
    ("torch.utils.collect_env", "run"),
    ("numpy.testing._private.utils", "runstring"),
    ("multiprocessing.util", "spawnv_passfds"),
    ("asyncio.unix_events", "_UnixSubprocessTransport"),
    ("subprocess", "Popen"),
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
]


def gadget_call(module: str, name: str, arg: str, protocol: int = 4) -> bytes:
    callable_ops = pb.stack_global(module, name) if protocol >= 4 else pb.glob(module, name)
    return pb.wrap(pb.call(callable_ops, pb.unicode(arg)), protocol)


def assert_refused(data: bytes, qualname: str, policy: str = "strict") -> None:
    report = safeload.scan_bytes(data, policy=policy)
    assert report.verdict is Verdict.UNSAFE
    refused = {f.global_name for f in report.findings if f.code in ("SL100", "SL101")}
    assert qualname in refused
    with pytest.raises(SafeloadError):
        safeload.loads(data, policy=policy)


@pytest.mark.parametrize(("module", "name"), GADGETS, ids=[f"{m}.{n}" for m, n in GADGETS])
@pytest.mark.parametrize("policy", ["strict", "default"])
def test_gadget_is_refused(module: str, name: str, policy: str, marker: Path) -> None:
    data = gadget_call(module, name, f"touch {marker}")
    assert_refused(data, f"{module}.{name}", policy)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3])
def test_gadget_is_refused_in_old_protocols(protocol: int, marker: Path) -> None:
    data = pb.wrap(pb.call(pb.glob("timeit", "timeit"), pb.string0(pb.marker_code(marker))), protocol)
    assert_refused(data, "timeit.timeit")


def live_fixtures(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Harmless but live calls of gadgets a denylist misses: bytes and the refused global."""
    code = pb.marker_code(marker)
    touch = f"touch {marker}"
    return {
        "runpy._run_code": (
            pb.wrap(pb.call(pb.glob("runpy", "_run_code"), pb.unicode(code), pb.EMPTY_DICT), 2),
            "runpy._run_code",
        ),
        "timeit.timeit": (
            pb.wrap(
                pb.call(
                    pb.glob("timeit", "timeit"),
                    pb.unicode(code),
                    pb.unicode("pass"),
                    pb.glob("time", "perf_counter"),
                    pb.binint(1),
                ),
                2,
            ),
            "timeit.timeit",
        ),
        "cProfile.run": (pb.wrap(pb.call(pb.glob("cProfile", "run"), pb.unicode(code)), 2), "cProfile.run"),
        "pydoc.pipepager": (
            pb.wrap(pb.call(pb.glob("pydoc", "pipepager"), pb.unicode(""), pb.unicode(touch)), 2),
            "pydoc.pipepager",
        ),
        "pkgutil.resolve_name": (
            pb.wrap(
                pb.call(
                    pb.call(pb.glob("pkgutil", "resolve_name"), pb.unicode("os:system")), pb.unicode(touch)
                ),
                2,
            ),
            "pkgutil.resolve_name",
        ),
        "_osx_support._read_output": (
            pb.wrap(pb.call(pb.glob("_osx_support", "_read_output"), pb.unicode(touch)), 2),
            "_osx_support._read_output",
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "key",
    [
        "runpy._run_code",
        "timeit.timeit",
        "cProfile.run",
        "pydoc.pipepager",
        "pkgutil.resolve_name",
        "_osx_support._read_output",
    ],
)
def test_live_gadgets(key: str, marker: Path, tmp_path: Path) -> None:
    data, qualname = live_fixtures(marker)[key]
    assert_refused(data, qualname)
    proof = tmp_path / "proof" / "LIVE"
    proof.parent.mkdir()
    live, _ = live_fixtures(proof)[key]
    pb.real_load_in_subprocess(live, proof.parent)
    assert proof.exists(), f"{key} fixture is not live"
