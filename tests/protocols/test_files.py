"""Files and folders a party keeps are owner-only whatever the umask (docs/protocol.md §2.9)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocols.files import atomic_write, private_dir


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would leave everything readable and writable by anyone."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_every_folder_made_is_0700_and_every_file_0600(tmp_path: Path, open_umask: None) -> None:
    leaf = private_dir(tmp_path / "state" / "jobs" / "j1" / "report")
    atomic_write(leaf / "report.json", b"{}")
    made = [tmp_path / "state", *(tmp_path / "state").rglob("*")]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in made}
    assert modes == {
        "state": 0o700,
        "state/jobs": 0o700,
        "state/jobs/j1": 0o700,
        "state/jobs/j1/report": 0o700,
        "state/jobs/j1/report/report.json": 0o600,
    }
    public = tmp_path / "ca.pem"
    atomic_write(public, b"cert", mode=0o644)  # only when asked for
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


def test_an_existing_folder_keeps_its_mode_and_a_file_is_no_folder(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    assert private_dir(tmp_path) == tmp_path
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        private_dir(tmp_path / "f")
