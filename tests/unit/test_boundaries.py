"""Module boundaries the design depends on, checked on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "safeload"


def _modules() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(PKG)), ast.parse(p.read_text(), str(p))) for p in sorted(PKG.rglob("*.py"))]


def _imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_explain_imports_fickling() -> None:
    users = {name for name, tree in _modules() if any(m.split(".")[0] == "fickling" for m in _imported(tree))}
    assert users == {"explain.py"}


def test_only_loader_backends_import_torch() -> None:
    users = {name for name, tree in _modules() if any(m.split(".")[0] == "torch" for m in _imported(tree))}
    assert users <= {"loader/torch_backend.py"}, users


def test_only_cli_exits() -> None:
    offenders = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "exit" and isinstance(node.func.value, ast.Name) and node.func.value.id == "sys":
                    offenders.append(name)
    assert set(offenders) <= {"cli.py"}, offenders


def test_no_code_running_calls_outside_the_loader() -> None:
    """No pickle.load(s), torch.load, eval, exec, __import__ or import_module on file content."""
    offenders = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if called in {"eval", "exec", "__import__"}:
                offenders.append((name, called))
            if called in {"load", "loads"} and owner in {"pickle", "_pickle", "torch", "marshal", "joblib"}:
                offenders.append((name, f"{owner}.{called}"))
            if called == "import_module" and not name.startswith("loader/"):
                offenders.append((name, called))
    assert offenders == []


def test_allow_pickle_never_true() -> None:
    for path in PKG.rglob("*.py"):
        assert "allow_pickle=True" not in path.read_text().replace(" ", ""), path
