"""PSI results on disk: written atomically, so a crash never leaves a partial result.

Layout under ``<state_dir>/psi/<job_id>/`` (files 0600, folders 0700): ``rows.npy`` (this party's
row indices in the shared order, ``np.save`` without pickle; absent where the party learns
no intersection), in ``GUEST_ONLY`` mode ``peer_positions.npy`` (G) or ``list_rows.npy`` (H)
for batch scoring, and ``summary.json`` (counts only). The folder is assembled under a
temporary name and renamed into place in one step. The folder's path is built with
:func:`protocols.ids.state_path`: a job id that is not an identifier, or a planted link
that would lead out of the state folder, is refused with
:class:`~protocols.ids.UnsafePathError` (docs/protocol.md §2.9).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from protocols.errors import AlignmentError
from protocols.files import private_dir
from protocols.ids import state_path
from psi.protocol import PsiResult


def result_dir(state_dir: Path, job_id: str) -> Path:
    """Where the result of ``job_id`` lives (:class:`~protocols.ids.UnsafePathError` unless
    ``job_id`` is an identifier and the folder stays under ``state_dir``)."""
    return state_path(state_dir, "psi", job_id)


def write_result(state_dir: Path, job_id: str, result: PsiResult) -> Path:
    """Write ``result`` atomically; return its folder."""
    final = result_dir(state_dir, job_id)
    private_dir(final.parent)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(mode=0o700)
    try:
        arrays = {
            "rows": result.rows,
            "peer_positions": result.peer_positions,
            "list_rows": result.list_rows,
        }
        for name, array in arrays.items():
            if array is None:
                continue
            with os.fdopen(_private(tmp / f"{name}.npy"), "wb") as handle:
                np.save(handle, array.astype(np.int64), allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
        summary = {
            "job_id": job_id,
            "role": result.role,
            "mode": result.mode.value,
            "run_id": result.run_id,
            "intersection_size": result.intersection_size,
            "own_list_size": result.own_list_size,
            "peer_list_size": result.peer_list_size,
            **result.summary,
        }
        with os.fdopen(_private(tmp / "summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _private(path: Path) -> int:
    """A new owner-only file (row indices say who is a shared customer)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def read_array(state_dir: Path, job_id: str, name: str) -> np.ndarray:
    """One of a finished PSI's index arrays (``rows``, ``peer_positions``, ``list_rows``)."""
    path = result_dir(state_dir, job_id) / f"{name}.npy"
    if not path.is_file():
        raise AlignmentError(f"PSI {job_id} kept no {name} (wrong mode, or not run here)")
    array: np.ndarray = np.load(path, allow_pickle=False)
    return array


def read_summary(state_dir: Path, job_id: str) -> dict[str, Any] | None:
    """The summary of a finished PSI, or ``None`` if this party holds no result of
    ``job_id`` (``OSError`` or ``ValueError`` if it cannot be read)."""
    path = result_dir(state_dir, job_id) / "summary.json"
    if not path.is_file():
        return None
    summary: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return summary


def read_result(state_dir: Path, job_id: str) -> tuple[dict[str, Any], np.ndarray | None]:
    """The summary and rows of a finished PSI."""
    folder = result_dir(state_dir, job_id)
    summary = read_summary(state_dir, job_id)
    if summary is None:
        raise AlignmentError(f"no PSI result for job {job_id} in {folder}")
    rows_path = folder / "rows.npy"
    rows = np.load(rows_path, allow_pickle=False) if rows_path.is_file() else None
    return summary, rows
