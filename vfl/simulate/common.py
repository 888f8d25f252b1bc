"""What every ``fit_*`` of :mod:`vfl.simulate` shares: input frames, PSI, files, workers.

* :func:`read_frame` and :func:`party_table`: a DataFrame or CSV path to a validated
  :class:`~vfl.data.tables.PartyTable`, with errors that name the party, the column and the
  row (missing id or label column, a label at the host, text in a feature column, a
  duplicate id, labels other than 0/1 or the given classes; :mod:`vfl.data.checks`);
* :func:`feature_spec` and :func:`class_names`: a caller's feature spec (or its TOML-like
  mapping) and label classes, checked before any work;
* :func:`align`: the real ECDH-PSI between the two tables' ids
  (:func:`psi.inprocess.align_in_process`), both learning the intersection, and a
  :class:`PsiSummary` of its counts;
* :func:`read_files` and :func:`write_files`: a party's saved folder kept in memory after
  the run's temporary state is gone, and written out again owner-only;
* :func:`workers` and :func:`state_folder`: the caller's executor and state folder, or a
  local process pool and a temporary folder for the call;
* :func:`announcer`: where the progress lines go;
* :func:`refuse_worker_import`: a clear error when a worker process re-imports an
  unguarded script that calls ``fit_*``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from protocols.errors import AlignmentError, ConfigError, DataError
from protocols.executor import Executor, LocalProcessExecutor
from protocols.files import atomic_write, private_dir
from psi.canon import IdType, prepare_ids
from psi.inprocess import align_in_process
from vfl.data.features import FeatureSpec
from vfl.data.tables import PartyTable, TableSpec, frame_table

Frame: TypeAlias = pd.DataFrame | str | os.PathLike[str]
"""A party's rows: a DataFrame, or the path of a CSV file (``.csv.gz`` too)."""


@dataclass(frozen=True)
class PsiSummary:
    """What the PSI found: each party's row count and the size of the intersection."""

    guest_rows: int
    host_rows: int
    intersection: int

    def __str__(self) -> str:
        return (
            f"PSI: {self.intersection} common ids of {self.guest_rows} at the guest and "
            f"{self.host_rows} at the host"
        )


def id_type_of(value: IdType | str) -> IdType:
    """``value`` as an :class:`~psi.canon.IdType`, or a :class:`ConfigError` listing them."""
    try:
        return IdType(value)
    except ValueError:
        choices = ", ".join(t.value for t in IdType)
        raise ConfigError(f"id_type {value!r} is not one of {choices}") from None


def feature_spec(
    value: FeatureSpec | Mapping[str, Any] | None, *, where: str
) -> FeatureSpec | None:
    """``value`` as a :class:`~vfl.data.features.FeatureSpec`: a mapping (the keys of a job
    file's ``[features]`` table) is parsed with errors naming ``where``; None stays None."""
    if value is None or isinstance(value, FeatureSpec):
        return value
    if isinstance(value, Mapping):
        return FeatureSpec.parse(value, where=where)
    raise ConfigError(
        f"{where} must be a FeatureSpec or a mapping of its keys, not {type(value).__name__}"
    )


def class_names(classes: Sequence[str] | None) -> tuple[str, ...] | None:
    """A binary task's label values in class order (``classes[1]`` is the positive class),
    or None (labels 0/1)."""
    if classes is None:
        return None
    if isinstance(classes, str) or not all(isinstance(c, str) and c.strip() for c in classes):
        raise ConfigError(f"classes = {classes!r}: give the label values as a list of text")
    names = tuple(c.strip() for c in classes)
    if len(names) != 2 or names[0] == names[1]:
        raise ConfigError(
            f"classes = {list(classes)}: a binary model needs two different label values, "
            "negative first"
        )
    return names


def read_frame(
    data: Frame, *, side: str, id_column: str, text_columns: Collection[str] = ()
) -> pd.DataFrame:
    """``data`` as a DataFrame (a path is read as CSV, its id column and ``text_columns``,
    e.g. categorical and date columns, as text)."""
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        if not path.is_file():
            raise DataError(f"the {side}'s data file {path} does not exist")
        try:
            return pd.read_csv(path, dtype={c: str for c in (id_column, *text_columns)})
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot be read as CSV ({type(exc).__name__})") from None
    raise ConfigError(f"{side} must be a pandas DataFrame or a CSV path, not {type(data).__name__}")


def party_table(
    frame: pd.DataFrame,
    *,
    side: str,
    id_column: str,
    label: str | None,
    columns: tuple[str, ...] | None = None,
    not_allowed: str | None = None,
    features: FeatureSpec | None = None,
    label_like: str | None = None,
    classes: tuple[str, ...] | None = None,
) -> PartyTable:
    """One party's validated rows.

    Parameters
    ----------
    frame
        The party's rows.
    side
        Who holds them (``"guest"``, ``"host"``, a client's name), for error messages.
    id_column
        The id column; every id present and unique.
    label
        The label column (binary 0/1), or None at a party without labels.
    columns
        The feature columns (default: every other column, or those of ``features``).
    not_allowed
        A column this party must not have (the label, at the host).
    features
        Which columns are features and how they are encoded (a saved model's
        :attr:`~vfl.data.preprocess.Preprocessor.spec`; default: every column but the id
        and the label, numeric); ``columns``, if given, replaces its feature columns.
    label_like
        The job's label column, at a party without labels: a column of this name is refused
        as a feature unless ``features`` lists it in ``feature_columns`` (or excludes it).
    classes
        The label values in class order (``classes[i]`` is label ``i``); None: labels 0/1.
    """
    where = f"the {side}'s data"
    available = [str(c) for c in frame.columns]
    for name, what in ((id_column, "id"), (label, "label")):
        if name is not None and name not in frame.columns:
            raise DataError(f"{where} has no {what} column {name!r}; its columns: {available}")
    if not_allowed is not None and not_allowed in frame.columns:
        raise DataError(
            f"{where} has a column {not_allowed!r}, the label: only the guest holds labels; "
            "drop it from the host's frame"
        )
    ids = frame[id_column]
    repeated = ids.duplicated() & ids.notna()
    if repeated.any():
        row = int(np.argmax(repeated.to_numpy()))
        first = int(np.argmax((ids == ids.iloc[row]).to_numpy()))
        raise DataError(
            f"{where}, column {id_column!r}: id {str(ids.iloc[row])[:40]!r} appears in rows "
            f"{first} and {row}; every id must be unique"
        )
    features = features or FeatureSpec()
    if columns is not None:
        features = replace(features, feature_columns=columns)
    if features.feature_columns is not None:
        missing = [c for c in features.feature_columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"{where} lacks the model's columns {missing}; its columns: {available}"
            )
    spec = TableSpec(
        path=Path(where),
        id_column=id_column,
        label_column=label,
        features=features,
        label_like=label_like,
        classes=classes,
        binary_labels=classes is None,
    )
    return frame_table(frame, spec=spec)


def align(
    guest: PartyTable,
    host: PartyTable,
    *,
    id_type: IdType,
    executor: Executor,
    id_column: str,
) -> tuple[np.ndarray, np.ndarray, PsiSummary]:
    """ECDH-PSI between the two tables' ids: each party's rows of the intersection, in one
    shared order, and the counts."""
    guest_ids = prepare_ids(list(guest.ids), id_type=id_type, column=id_column, source="guest")
    host_ids = prepare_ids(list(host.ids), id_type=id_type, column=id_column, source="host")
    at_guest, at_host = align_in_process(
        guest_ids=guest_ids, host_ids=host_ids, guest_executor=executor, job_id="simulate-psi"
    )
    if at_guest.rows is None or at_host.rows is None:
        raise AlignmentError("the PSI returned no rows")  # both-learn mode always does
    summary = PsiSummary(
        guest_rows=len(guest), host_rows=len(host), intersection=len(at_guest.rows)
    )
    at_guest.require_shared(detail=f"id_type {id_type.value!r}; {summary}")
    return at_guest.rows, at_host.rows, summary


def read_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path (a saved model kept in memory)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    """Write what :func:`read_files` read under ``folder``: files 0600, folders 0700."""
    for name, data in files.items():
        path = folder / name
        private_dir(path.parent)
        atomic_write(path, data, mode=0o600)
    return folder


@contextlib.contextmanager
def state_folder(state_dir: str | Path | None, *, prefix: str) -> Iterator[Path]:
    """``state_dir``, or a temporary folder deleted at the end."""
    if state_dir is not None:
        yield Path(state_dir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def workers(executor: Executor | None) -> Iterator[Executor]:
    """``executor``, or a local process pool over every CPU, closed at the end."""
    if executor is not None:
        yield executor
        return
    with LocalProcessExecutor() as own:
        yield own


def announcer(progress: bool) -> Callable[[str], None]:
    """``print`` with ``progress``, else a function that prints nothing."""
    return print if progress else _silent


def _silent(message: str) -> None:
    """Print nothing (``progress=False``)."""


def refuse_worker_import(name: str) -> None:
    """Raise if ``name`` is being called from the top level of a script that a worker
    process is importing (the process pool's workers import the main script again; code at
    its top level must sit under ``if __name__ == "__main__":``)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            raise ConfigError(
                f"{name} was called while a worker process imported your script: put the "
                'call under `if __name__ == "__main__":` (the workers import the script again)'
            )
        frame = frame.f_back
