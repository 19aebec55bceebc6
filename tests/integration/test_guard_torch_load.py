"""guard_torch_load: torch.load called by code we do not control goes through safeload, retries too.

The malicious checkpoint is real torch.save output whose payload only creates the test's marker
file; the `marker` fixture asserts it never appears.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.serialization

import safeload
from safeload.errors import PolicyError, UnsafeModelError
from tests import pickle_builder as pb

ORIGINAL_LOAD = torch.load

# What libraries do with a checkpoint torch.load(weights_only=True) refuses: load it again, unsafely.
LIBRARY_WITH_FALLBACK = """
import pickle, torch
def library_load(path):
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, weights_only=False)
"""


def _library() -> types.ModuleType:
    module = types.ModuleType("library_with_fallback")
    exec(compile(LIBRARY_WITH_FALLBACK, "library_with_fallback", "exec"), module.__dict__)  # noqa: S102
    return module


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (exec, (pb.marker_code(marker),))

    torch.save({"w": torch.ones(3), "cfg": Payload()}, path)
    return path


def _benign_checkpoint(path: Path) -> dict[str, Any]:
    state = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "h": torch.tensor([1.5, -2.25], dtype=torch.float16),
        "b": torch.tensor([True, False]),
        "step": 7,
    }
    torch.save(state, path)
    return state


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and bytes(a.contiguous().view(torch.uint8).flatten().tolist())
        == bytes(b.contiguous().view(torch.uint8).flatten().tolist())
    )


def test_the_fallback_runs_the_payload_without_the_guard(tmp_path: Path) -> None:
    """The trick is live: the library's retry really runs the payload under plain torch.load."""
    live_marker = tmp_path / "LIVE_MARKER"
    path = _malicious_checkpoint(tmp_path / "model.pt", live_marker)
    script = LIBRARY_WITH_FALLBACK + f"\nlibrary_load({str(path)!r})\n"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, capture_output=True)
    assert live_marker.exists()


def test_the_guard_refuses_the_retry(marker: Path, tmp_path: Path) -> None:
    path = _malicious_checkpoint(tmp_path / "model.pt", marker)
    calls: list[bool | None] = []
    library = _library()

    with safeload.guard_torch_load():
        guarded = torch.load

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs.get("weights_only"))
            return guarded(*args, **kwargs)

        torch.load = counting  # type: ignore[assignment]
        try:
            with pytest.raises(UnsafeModelError) as info:
                library.library_load(path)
        finally:
            torch.load = guarded  # type: ignore[assignment]
    assert calls == [True, False]  # the library did retry, and the retry was refused too
    assert info.value.global_name == "builtins.exec"
    assert torch.load is ORIGINAL_LOAD


def test_both_names_of_torch_load_are_guarded(marker: Path, tmp_path: Path) -> None:
    path = _malicious_checkpoint(tmp_path / "model.pt", marker)
    with safeload.guard_torch_load():
        assert torch.serialization.load is torch.load
        for load in (torch.load, torch.serialization.load):
            with pytest.raises(UnsafeModelError):
                load(path, weights_only=False)
            with open(path, "rb") as f, pytest.raises(UnsafeModelError):
                load(f, map_location="cpu", weights_only=False)
    assert torch.load is ORIGINAL_LOAD and torch.serialization.load is ORIGINAL_LOAD


def test_benign_checkpoints_load_as_torch_loads_them(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _benign_checkpoint(path)
    expected = torch.load(path, weights_only=True)
    data = path.read_bytes()
    with safeload.guard_torch_load(policy="strict"):
        results = [
            torch.load(path),
            torch.load(path, weights_only=False),
            torch.load(str(path), "cpu"),
            torch.load(path, map_location=torch.device("cpu"), mmap=True),
            torch.load(io.BytesIO(data), pickle_module=pickle),
            torch.serialization.load(path, map_location=lambda storage, _location: storage),
        ]
    for got in results:
        assert got.keys() == expected.keys()
        assert got["step"] == 7
        for key in ("w", "h", "b"):
            assert _same_bits(got[key], expected[key]), key


def test_the_policy_is_the_guards(tmp_path: Path) -> None:
    """A numpy scalar: allowed by default, not by strict, and by strict with allow=."""
    import numpy as np

    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "best": np.float64(0.5)}, path, pickle_protocol=2)
    with safeload.guard_torch_load(policy="strict"), pytest.raises(UnsafeModelError) as info:
        torch.load(path, weights_only=False)
    refused = info.value.global_name
    assert refused is not None and refused.startswith("numpy")
    with safeload.guard_torch_load(policy="default"):
        assert float(torch.load(path)["best"]) == 0.5
    with safeload.guard_torch_load(policy="strict", allow=[refused, "numpy.dtype"]):
        assert float(torch.load(path)["best"]) == 0.5


def test_another_pickle_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _benign_checkpoint(path)
    custom = types.ModuleType("custom_pickle")
    with safeload.guard_torch_load(), pytest.raises(TypeError, match="custom_pickle"):
        torch.load(path, pickle_module=custom)


def test_a_bad_policy_fails_before_anything_is_swapped() -> None:
    with pytest.raises(PolicyError), safeload.guard_torch_load(policy="no-such-policy"):
        pass
    assert torch.load is ORIGINAL_LOAD


def test_torch_load_comes_back_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="inside"), safeload.guard_torch_load():
        assert torch.load is not ORIGINAL_LOAD
        raise RuntimeError("inside")
    assert torch.load is ORIGINAL_LOAD and torch.serialization.load is ORIGINAL_LOAD


def test_nested_guards(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "model.pt"
    torch.save({"best": np.float64(0.5)}, path, pickle_protocol=2)
    with safeload.guard_torch_load(policy="default"):
        outer = torch.load
        with safeload.guard_torch_load(policy="strict"):
            with pytest.raises(UnsafeModelError):
                torch.load(path)  # the inner, stricter policy decides
        assert torch.load is outer
        assert float(torch.load(path)["best"]) == 0.5
    assert torch.load is ORIGINAL_LOAD


def test_guards_left_out_of_order_never_unguard_a_running_block(marker: Path, tmp_path: Path) -> None:
    """Thread A enters, thread B enters, A leaves first: B's block must still be guarded."""
    path = _malicious_checkpoint(tmp_path / "model.pt", marker)
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen_in_b: list[str] = []

    def thread_a() -> None:
        with safeload.guard_torch_load():
            a_entered.set()
            b_entered.wait(30)
        a_left.set()

    def thread_b() -> None:
        a_entered.wait(30)
        with safeload.guard_torch_load():
            b_entered.set()
            a_left.wait(30)
            try:
                torch.load(path, weights_only=False)
            except UnsafeModelError as exc:
                seen_in_b.append(str(exc.global_name))

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen_in_b == ["builtins.exec"]
    assert torch.load is ORIGINAL_LOAD


def test_torch_hub_loads_through_the_guard(marker: Path, tmp_path: Path) -> None:
    """Real library code that looks torch.load up when it calls it: torch.hub's loader."""
    import torch.hub

    hub = tmp_path / "hub"
    hub.mkdir()
    _malicious_checkpoint(hub / "model.pt", marker)
    state = _benign_checkpoint(hub / "ok.pt")
    expected = torch.load(hub / "ok.pt", weights_only=True)
    # Both files are already in the hub's directory: nothing is downloaded.
    base = "https://example.invalid/weights/"
    with safeload.guard_torch_load():
        with pytest.raises(UnsafeModelError) as info:
            torch.hub.load_state_dict_from_url(base + "model.pt", model_dir=str(hub), weights_only=False)
        got = torch.hub.load_state_dict_from_url(base + "ok.pt", model_dir=str(hub), weights_only=False)
    assert info.value.global_name == "builtins.exec"
    assert got.keys() == state.keys() and got["step"] == 7
    for key in ("w", "h", "b"):
        assert _same_bits(got[key], expected[key]), key
