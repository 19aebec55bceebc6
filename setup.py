"""Build hook: the opcode walker compiled with Cython, when it can be.

Everything else about the package is in pyproject.toml. The walker is the scanner's inner loop and
plain Python costs ~40 machine instructions per bytecode there; Cython turns the same source into C
calls on the same Python objects (no C types are declared, so integers, bytes and exceptions behave
exactly as in Python) and a walk takes about a third fewer instructions.

The compiled module is ``safeload.analysis._walker_c``, made from a copy of ``walker.py`` that
records the source's SHA-256. ``walker.py`` uses it only while that digest matches its own source,
so an edited walker in an editable install runs as Python until it is rebuilt, never stale.

On Linux, ``safeload.audit_treewalk_c`` (from ``audit_treewalk.pyx``, C-level code) lists and
stat's an audited tree for the replay's key without a Python object per file. Where it is not
built, audit_walk computes the same key in Python.

Without Cython or a C compiler, or with ``SAFELOAD_PURE_PYTHON=1``, the package is pure Python:
slower, the same results. ``SAFELOAD_REQUIRE_COMPILED=1`` makes a failed compile fail the build.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
WALKER = ROOT / "safeload" / "analysis" / "walker.py"
GENERATED = ROOT / "build" / "cython" / "_walker_c.py"
TREEWALK = Path("safeload") / "audit_treewalk.pyx"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


def _extensions() -> list[Extension]:
    required = _flag("SAFELOAD_REQUIRE_COMPILED")
    if _flag("SAFELOAD_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if required:
            raise
        return []
    source = WALKER.read_bytes()
    GENERATED.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(source).hexdigest()
    GENERATED.write_bytes(source + f'\nSOURCE_SHA256 = "{digest}"\n'.encode())
    extensions = [
        Extension("safeload.analysis._walker_c", [str(GENERATED.relative_to(ROOT))], optional=not required)
    ]
    if sys.platform.startswith("linux"):  # it reads struct stat's Linux field names
        extensions.append(Extension("safeload.audit_treewalk_c", [str(TREEWALK)], optional=not required))
    return cythonize(
        extensions,
        language_level=3,
        quiet=True,
        # Annotations stay documentation: typed arguments would add type checks plain Python lacks.
        compiler_directives={"annotation_typing": False},
        build_dir=str(GENERATED.parent.relative_to(ROOT)),
    )


setup(ext_modules=_extensions())
