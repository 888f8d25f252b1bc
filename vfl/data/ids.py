"""Reading a party's identifier column (CSV or Parquet) for PSI, with clear errors."""

from __future__ import annotations

import zlib
from pathlib import Path

import pandas as pd

from protocols.errors import DataError


def load_id_column(
    path: Path, column: str, *, timestamp_column: str | None = None
) -> tuple[list[object], list[object] | None]:
    """The values of ``column`` (as strings) and optionally of ``timestamp_column``."""
    if not path.is_file():
        raise DataError(
            f"data file {path} does not exist; check the [data] alias in the config",
            public="the data file of the alias is missing",
        )
    wanted = [column] + ([timestamp_column] if timestamp_column else [])
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path, columns=wanted)
        else:
            frame = pd.read_csv(path, usecols=wanted, dtype={column: str}, keep_default_na=False)
    except (OSError, EOFError, zlib.error) as exc:  # e.g. a damaged or truncated .csv.gz
        raise DataError(
            f"{path}: cannot be read ({type(exc).__name__})",
            public="the data file of the alias cannot be read",
        ) from None
    except ValueError as exc:
        available = _columns(path)
        raise DataError(
            f"{path}: cannot read column(s) {wanted} ({exc}); available columns: {available}",
            public="a configured column cannot be read from the data",
        ) from None
    ids = frame[column].tolist()
    stamps = None
    if timestamp_column:
        stamps = pd.to_datetime(frame[timestamp_column], errors="coerce")
        bad = stamps.isna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(
                f"{path} row {row}, column {timestamp_column!r}: not a timestamp",
                public="the timestamp column holds a value that is not a timestamp",
            )
        stamps = stamps.tolist()
    return ids, stamps


def _columns(path: Path) -> list[str]:
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        return list(pd.read_csv(path, nrows=0).columns)
    except Exception:  # noqa: BLE001 - best effort for an error message
        return []
