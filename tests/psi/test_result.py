"""PSI results are written atomically: a crash never leaves a partial result."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from protocols.errors import AlignmentError
from protocols.ids import UnsafePathError
from psi.protocol import PsiMode, PsiResult
from psi.result import read_result, result_dir, write_result


def result(rows: list[int] | None) -> PsiResult:
    return PsiResult(
        role="guest",
        mode=PsiMode.BOTH,
        run_id="ab",
        intersection_size=None if rows is None else len(rows),
        rows=None if rows is None else np.array(rows),
        own_list_size=10,
        peer_list_size=12,
        summary={"usable_ids": 10},
    )


def test_round_trip_and_replace(tmp_path: Path) -> None:
    write_result(tmp_path, "job-1", result([3, 1, 2]))
    summary, rows = read_result(tmp_path, "job-1")
    assert rows is not None and rows.tolist() == [3, 1, 2] and summary["intersection_size"] == 3
    write_result(tmp_path, "job-1", result(None))
    summary, rows = read_result(tmp_path, "job-1")
    assert rows is None and summary["intersection_size"] is None
    assert [p.name for p in result_dir(tmp_path, "job-1").parent.iterdir()] == ["job-1"]
    folder = result_dir(tmp_path, "job-1")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o600}


@pytest.mark.parametrize("job_id", [".", "..", "/tmp/x", "a/b", "a\x00", "", "x" * 300])
def test_a_job_id_that_is_not_an_identifier_names_no_folder(tmp_path: Path, job_id: str) -> None:
    """A PSI job id "." used to make the host replace its whole psi/ folder."""
    write_result(tmp_path, "kept", result([1]))
    with pytest.raises(UnsafePathError):
        write_result(tmp_path, job_id, result([2]))
    with pytest.raises(UnsafePathError):
        read_result(tmp_path, job_id)
    assert [p.name for p in (tmp_path / "psi").iterdir()] == ["kept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psi"]


def test_a_crash_while_writing_keeps_the_previous_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_result(tmp_path, "j", result([7, 8]))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        write_result(tmp_path, "j", result([1]))
    _, rows = read_result(tmp_path, "j")
    assert rows is not None and rows.tolist() == [7, 8]
    assert [p.name for p in (tmp_path / "psi").iterdir()] == ["j"]  # no temporary leftovers


def test_missing_result(tmp_path: Path) -> None:
    with pytest.raises(AlignmentError, match="no PSI result"):
        read_result(tmp_path, "nothing")
