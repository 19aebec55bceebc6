from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """Where a malicious fixture's harmless payload would write. Must never exist after the test."""
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a payload ran: the marker file was created"
