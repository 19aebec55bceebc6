"""JSON report and its published JSON schema, both generated from the pydantic models.

The schema in ``schema/scanrun.schema.json`` (repo root) is regenerated with
``python -m safeload.report.json_report --write-schema``; a test checks that it is current.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from safeload.atomic import write_atomic
from safeload.model import SCHEMA_VERSION, ScanRun, dump_json

SCHEMA_FILE = Path("schema") / "scanrun.schema.json"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def render_json(run: ScanRun, *, verbose: bool = False) -> str:
    """The whole run, every field (verbose changes nothing: JSON is for machines)."""
    return dump_json(run, indent=2) + "\n"


def json_schema() -> dict[str, Any]:
    """Schema of a report: a `scan` run or an `audit` run (which carries ``"kind": "audit"``)."""
    # Here, not at the top: rendering a scan's report never needs the audit models.
    from safeload.audit_model import AuditRun

    schema = TypeAdapter(ScanRun | AuditRun).json_schema(mode="serialization")
    return {
        "$schema": _DIALECT,
        "title": "safeload report",
        "description": f"Output of `safeload scan --format json` and `safeload audit --format json`, "
        f"schema_version {SCHEMA_VERSION}.",
        **schema,
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, schema_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safeload.report.json_report")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write-schema", nargs="?", const=str(SCHEMA_FILE), metavar="PATH")
    group.add_argument("--check-schema", nargs="?", const=str(SCHEMA_FILE), metavar="PATH")
    args = parser.parse_args(argv)
    if args.write_schema:
        write_schema(Path(args.write_schema))
        return 0
    path = Path(args.check_schema)
    return 0 if path.is_file() and path.read_text(encoding="utf-8") == schema_text() else 1


if __name__ == "__main__":
    raise SystemExit(main())
