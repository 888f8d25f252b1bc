"""Checking a party's table: every problem at once (:func:`check_table`), or the first one as
a :class:`~protocols.errors.DataError` (:func:`vfl.data.tables.load_table`, same checks).

What is checked, in this order (each finding names the file, the line as an editor shows it
-- a CSV's data row ``i`` is line ``i + 2``, a Parquet file's is row ``i + 1``, a DataFrame's
row ``i`` -- and the column; never a feature value or a label):

1. the id column and (at the guest) the label column exist; the feature columns
   (:class:`~vfl.data.features.FeatureSpec`) exist, exclude the id and the label, and a
   party without labels has no feature named like the job's label column (``label_like``)
   unless ``feature_columns`` lists it;
2. ids: a row without an id is not used (the PSI drops it, docs/protocol.md §3.2) and its
   values are not checked; ids written as decimal numbers (``133.0``) are an error;
   duplicate ids are reported by :func:`check_table` only (the PSI's duplicates policy
   decides about them);
3. numeric columns: a text value, a missing or infinite value (unless an imputation policy
   fills it) and a magnitude above :data:`MAX_ABS` are errors; categorical columns take
   any text; date columns must parse (unless an imputation policy fills what does not);
4. labels: numeric (0/1 for a binary task), or one of the job's ``classes``;
5. warnings: constant columns, and with ``warn_binary`` every two-valued column (a feature
   derived from the label often is one).
"""

from __future__ import annotations

import json
import logging
import warnings
import zlib
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from protocols.errors import DataError
from protocols.files import atomic_write, private_dir
from psi.canon import DuplicatePolicy
from vfl.data.features import FeatureSpec, ImputePolicy

if TYPE_CHECKING:
    from vfl.data.tables import TableSpec

logger = logging.getLogger(__name__)

MAX_ABS = 1e100
"""The largest magnitude a feature value may have. Scaling sums squared deviations: with
``|x| <= 1e100`` each is at most ``4e200``, so the sum stays finite (below ``1.8e308``) for
any number of rows up to ``4e107``; larger values would overflow to infinity or drown every
other value of the column."""

NA_TEXT = (
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
)
"""Text read as a missing value in a CSV's feature and label columns (pandas' defaults); an
id is always text and never missing but when empty."""

FLOAT_ID = r"-?\d+\.0+"
LISTED = 10  # duplicate ids named one by one; the rest are counted
IMPUTE_HINT = 'set an imputation policy (impute = "mean", "median" or "zero")'


class Severity(StrEnum):
    """Whether a finding stops the table from loading."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One problem of a table: ``line`` (CSV) or row (Parquet) and ``column`` where known."""

    severity: Severity
    message: str
    line: int | None = None
    column: str | None = None
    public: str | None = field(default=None, compare=False)  # peer-safe text of its error
    # a value from the data (the largest magnitude, an id): in the owner-only report and on
    # the operator's terminal (:meth:`DataReport.render`), never in an error or a log line
    detail: str | None = field(default=None, compare=False)

    def located(self, source: str, *, unit: str = "line") -> str:
        """``<source> line 5, column 'x': <message>`` (without :attr:`detail`: log-safe)."""
        parts = [f"{unit} {self.line}"] if self.line is not None else []
        parts += [f"column {self.column!r}"] if self.column is not None else []
        where = f" {', '.join(parts)}" if parts else ""
        return f"{source}{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON."""
        return {
            "severity": self.severity.value,
            "message": self.message,
            "line": self.line,
            "column": self.column,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class DataReport:
    """Everything :func:`check_table` found in one file."""

    source: str
    rows: int
    usable_rows: int
    dropped_ids: int
    columns: tuple[str, ...]
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        """The findings that stop the table from loading."""
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """The findings worth a look."""
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)

    @property
    def ok(self) -> bool:
        """Whether the table loads (no errors)."""
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (counts, column names, findings)."""
        return {
            "source": self.source,
            "rows": self.rows,
            "usable_rows": self.usable_rows,
            "dropped_ids": self.dropped_ids,
            "columns": list(self.columns),
            "ok": self.ok,
            "findings": [f.to_json() for f in self.findings],
        }

    def render(self) -> str:
        """Human text: a summary line, then ``path:line: column 'x': message`` per finding."""
        out = [
            f"{self.source}: {self.rows} rows, {self.usable_rows} usable "
            f"({self.dropped_ids} without an id), {len(self.columns)} feature columns: "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        ]
        rows = Path(self.source).suffix.lower() in (".parquet", ".pq")
        for f in self.findings:
            where = self.source
            if f.line is not None:
                where += f":row {f.line}" if rows else f":{f.line}"
            column = f" column {f.column!r}:" if f.column is not None else ""
            kind = " warning:" if f.severity is Severity.WARNING else ""
            detail = f" ({f.detail})" if f.detail else ""
            out.append(f"{where}:{column}{kind} {f.message}{detail}")
        return "\n".join(out)


def check_table(
    spec: TableSpec,
    *,
    warn_binary: bool = False,
    duplicates: DuplicatePolicy = DuplicatePolicy.ERROR,
) -> DataReport:
    """Read ``spec``'s file and report every problem, without raising.

    Parameters
    ----------
    spec
        The file and its columns, as a job would load them.
    warn_binary
        Warn about every feature column with exactly two distinct values (a party without
        labels checks that none is derived from the guest's label).
    duplicates
        The PSI's duplicates policy for this file: under ``error`` a repeated id is an
        error, otherwise a warning.
    """
    try:
        frame = read_file(spec)
    except DataError as exc:
        message = str(exc).removeprefix(f"{spec.path}: ")
        return DataReport(str(spec.path), 0, 0, 0, (), (Finding(Severity.ERROR, message),))
    found = inspect_frame(
        frame,
        spec=spec,
        origin=Origin.of(spec.path),
        warn_binary=warn_binary,
        duplicates=duplicates,
    )
    return DataReport(
        source=str(spec.path),
        rows=len(frame),
        usable_rows=int(found.usable.sum()),
        dropped_ids=int((~found.usable).sum()),
        columns=() if found.features is None else found.features.feature_columns or (),
        findings=found.findings,
    )


def read_file(spec: TableSpec) -> pd.DataFrame:
    """The rows of ``spec.path`` (CSV, or Parquet by its suffix ``.parquet``/``.pq``).

    In a CSV, the id column, the categorical and date columns (and the label column where
    ``classes`` name its values) are read as text, the id never as missing; the other
    columns take :data:`NA_TEXT` as missing.
    """
    path = spec.path
    if not path.is_file():
        raise DataError(f"{path}: the data file does not exist", public="the data file is missing")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
        text = {spec.id_column, *spec.features.categorical_columns, *spec.features.date_columns}
        if spec.classes is not None and spec.label_column is not None:
            text.add(spec.label_column)
        return pd.read_csv(
            path,
            dtype={c: str for c in header if c in text},
            keep_default_na=False,
            na_values={c: list(NA_TEXT) for c in header if c != spec.id_column},
        )
    except (ValueError, OSError, EOFError, zlib.error) as exc:  # a truncated/damaged .gz too
        raise DataError(
            f"{path}: cannot be read as {path.suffix or 'CSV'} ({type(exc).__name__})",
            public="the data file cannot be read",
        ) from None


@dataclass(frozen=True)
class Origin:
    """How rows are numbered in messages: ``unit`` and the number of row 0."""

    unit: str
    first: int

    @classmethod
    def of(cls, path: Path) -> Origin:
        """Lines of a CSV (after its header), rows of a Parquet file, from 1."""
        return cls("row", 1) if path.suffix.lower() in (".parquet", ".pq") else cls("line", 2)


FRAME = Origin("row", 0)  # a DataFrame in memory: its row positions


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_frame` read: the findings, and the columns as arrays.

    ``features`` is None when the columns themselves are wrong (the arrays are then empty).
    Rows without an id (``usable`` False) hold NaN, None and NaN.
    """

    findings: tuple[Finding, ...]
    features: FeatureSpec | None
    ids: np.ndarray
    usable: np.ndarray
    numeric: tuple[str, ...] = ()
    values: np.ndarray | None = None
    categorical: tuple[str, ...] = ()
    text: np.ndarray | None = None
    dates: tuple[str, ...] = ()
    days: np.ndarray | None = None
    labels: np.ndarray | None = None


def inspect_frame(
    frame: pd.DataFrame,
    *,
    spec: TableSpec,
    origin: Origin,
    warn_binary: bool = False,
    duplicates: DuplicatePolicy | None = None,
) -> Inspection:
    """Steps 1-5 of the module docstring (duplicates only with a ``duplicates`` policy)."""
    check = _Checker(origin)
    available = [str(c) for c in frame.columns]
    frame = frame.set_axis(available, axis=1)
    features = check.columns(spec, available)
    ids, usable = check.ids(frame, spec, available, duplicates)
    if features is None or ids is None:
        ids = np.array([], dtype=object) if ids is None else ids
        return Inspection(tuple(check.findings), None, ids, usable)
    fs, n = spec.features, len(frame)
    numeric = tuple(c for c in features if c not in fs.categorical_columns + fs.date_columns)
    categorical = tuple(c for c in features if c in fs.categorical_columns)
    dates = tuple(c for c in features if c in fs.date_columns)
    values = np.empty((n, len(numeric)))
    for j, c in enumerate(numeric):
        values[:, j] = check.numbers(frame[c], c, usable, fs.impute)
    text = np.empty((n, len(categorical)), dtype=object)
    for j, c in enumerate(categorical):
        text[:, j] = check.categories(frame[c], usable)
    days = np.empty((n, len(dates)))
    for j, c in enumerate(dates):
        days[:, j] = check.dates(frame[c], c, usable, fs.impute)
    labels = check.labels(frame, spec, usable) if spec.label_column is not None else None
    check.spread(numeric, values, categorical, text, usable, warn_binary=warn_binary)
    return Inspection(
        findings=tuple(check.findings),
        features=replace(fs, feature_columns=features),
        ids=ids,
        usable=usable,
        numeric=numeric,
        values=values,
        categorical=categorical,
        text=text,
        dates=dates,
        days=days,
        labels=labels,
    )


class _Checker:
    """The checks of :func:`inspect_frame`, collecting findings."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.findings: list[Finding] = []

    def add(
        self,
        message: str,
        *,
        column: str | None = None,
        row: int | None = None,
        count: int = 1,
        severity: Severity = Severity.ERROR,
        public: str | None = None,
        detail: str | None = None,
    ) -> None:
        if count > 1:
            head, sep, tail = message.partition(";")
            message = f"{head} ({count} rows, the first here){sep}{tail}"
        line = None if row is None else row + self.origin.first
        self.findings.append(Finding(severity, message, line, column, public, detail))

    # -- step 1 ----------------------------------------------------------------------------

    def columns(self, spec: TableSpec, available: list[str]) -> tuple[str, ...] | None:
        """The feature columns, in order, or None after an error."""
        before = len(self.findings)
        fs = spec.features
        twice = sorted({c for c in available if available.count(c) > 1})
        if twice:
            self.add(f"the file has several columns named {twice[0]!r}; rename them")
            return None
        for column, what in ((spec.id_column, "id"), (spec.label_column, "label")):
            if column is not None and column not in available:
                self.add(
                    f"no column {column!r}; the file has {available}",
                    column=column,
                    public=f"the data has no {what} column of the configured name",
                )
        own = {c for c in (spec.id_column, spec.label_column) if c is not None}
        if fs.feature_columns is not None:
            features = list(fs.feature_columns)
            missing = [c for c in features if c not in available]
            if missing:
                self.add(
                    f"feature columns {missing} are not in the file (names are case- and "
                    f"space-sensitive); the file has {available}",
                    public="the data lacks feature columns the job or model needs",
                )
            for c in features:
                if c in own:
                    what = "id" if c == spec.id_column else "label"
                    self.add(f"the {what} column cannot be a feature; remove it", column=c)
        else:
            features = [c for c in available if c not in own and c not in fs.exclude_columns]
            for c in fs.exclude_columns:
                if c not in available:
                    self.add(
                        "exclude_columns names it, but the file has no such column",
                        column=c,
                        severity=Severity.WARNING,
                    )
            like = spec.label_like
            if spec.label_column is None and like is not None and like in features:
                self.add(
                    f"column {like!r} has the name of the job's label column; a party without "
                    "labels must not use it as a feature: exclude it, or list it in "
                    "feature_columns if it is not the label",
                    column=like,
                    public="a column named like the job's label column is refused as a "
                    "feature at a party without labels",
                )
        for kind, declared in (
            ("categorical", fs.categorical_columns),
            ("a date column", fs.date_columns),
        ):
            for c in declared:
                if c not in available:
                    self.add(f"declared {kind}, but the file has no such column", column=c)
                elif c not in features:
                    self.add(
                        f"declared {kind} but not a feature column; list it in feature_columns",
                        column=c,
                    )
        if not features and not self.errors_since(before):
            self.add(f"no feature columns besides {sorted(own)}")
        return None if self.errors_since(before) else tuple(features)

    def errors_since(self, start: int) -> bool:
        return any(f.severity is Severity.ERROR for f in self.findings[start:])

    # -- step 2 ----------------------------------------------------------------------------

    def ids(
        self,
        frame: pd.DataFrame,
        spec: TableSpec,
        available: list[str],
        duplicates: DuplicatePolicy | None,
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """The ids as text ("" where missing) and which rows have one."""
        column = spec.id_column
        if column not in available:
            return None, np.zeros(0, dtype=bool)  # reported by columns()
        raw = frame[column]
        ids = raw.astype("string").fillna("").to_numpy(dtype=object)
        stripped = pd.Series(ids, dtype=object).str.strip()
        usable = (stripped != "").to_numpy()
        present = stripped[usable]
        if len(present) and bool(present.str.fullmatch(FLOAT_ID).all()):
            row = int(np.argmax(usable))
            first = str(present.iloc[0])
            self.add(
                "ids look like decimal numbers (133.0 where the other party has 133): they will "
                "not match; write the ids as integers",
                column=column,
                row=row,
                public="the id column holds decimal numbers",
                detail=f"the first is {first[:40]!r}",
            )
        if duplicates is not None:
            self.repeated(stripped.to_numpy(dtype=object), usable, column, duplicates)
        return ids, usable

    def repeated(
        self, ids: np.ndarray, usable: np.ndarray, column: str, policy: DuplicatePolicy
    ) -> None:
        rows = np.flatnonzero(usable)
        codes, _ = pd.factorize(ids[rows])
        _, first = np.unique(codes, return_index=True)  # codes count 0, 1, ... by first row
        later = np.flatnonzero(first[codes] != np.arange(len(codes)))
        if not len(later):
            return
        pairs = [(int(rows[first[codes[i]]]), int(rows[i])) for i in later]
        to_line = self.origin.first
        if policy is not DuplicatePolicy.ERROR:
            a, b = pairs[0]
            self.add(
                f"{len(pairs)} rows repeat an earlier id ({self.origin.unit} {b + to_line} "
                f"repeats {a + to_line}); the PSI keeps the {policy.value} row of each",
                column=column,
                severity=Severity.WARNING,
            )
            return
        for a, b in pairs[:LISTED]:
            self.add(
                f"the same id as {self.origin.unit} {a + to_line}; every id must be unique, "
                'unless the PSI\'s duplicates policy is "first" or "latest"',
                column=column,
                row=b,
            )
        if len(pairs) > LISTED:
            self.add(f"{len(pairs) - LISTED} more rows repeat an earlier id", column=column)

    # -- step 3 ----------------------------------------------------------------------------

    def numbers(
        self, raw: pd.Series, column: str, usable: np.ndarray, impute: ImputePolicy
    ) -> np.ndarray:
        """A numeric column as float64; NaN where missing, and in rows without an id."""
        if pd.api.types.is_datetime64_any_dtype(raw.dtype):
            self.add("holds dates; declare it in date_columns, or exclude it", column=column)
            return np.full(len(raw), np.nan)
        try:
            numbers = pd.to_numeric(raw, errors="coerce")
            values: np.ndarray = numbers.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        except (TypeError, ValueError):
            values = np.full(len(raw), np.nan)
        text = np.isnan(values) & raw.notna().to_numpy() & usable
        self.at(
            text,
            column,
            "not a number; if the column holds categories, declare it categorical "
            f'(categorical = ["{column}"]), or leave it out (exclude_columns = ["{column}"])',
        )
        finite = np.isfinite(values)
        if impute is ImputePolicy.ERROR:
            self.at(
                ~finite & ~text & usable,
                column,
                f"missing or infinite value; fix the file or {IMPUTE_HINT}",
            )
        with np.errstate(invalid="ignore"):
            extreme = finite & (np.abs(values) > MAX_ABS) & usable
        if extreme.any():
            row = int(np.argmax(np.where(extreme, np.abs(values), -1.0)))
            many = f"{int(extreme.sum())} values" if extreme.sum() > 1 else "a value"
            self.add(
                f"{many} beyond {MAX_ABS:g} in magnitude, the most this engine scales safely, "
                "the largest here: rescale the column (e.g. take its logarithm), or exclude it",
                column=column,
                row=row,
                detail=f"the largest is {abs(values[row]):.3g}",
            )
        values[~finite | ~usable] = np.nan  # imputed from training rows, or never used
        return values

    def categories(self, raw: pd.Series, usable: np.ndarray) -> np.ndarray:
        """A categorical column as text, None where missing or in rows without an id."""
        text: np.ndarray = raw.astype("string").str.strip().to_numpy(dtype=object, na_value=None)
        text[(text == "") | ~usable] = None
        return text

    def dates(
        self, raw: pd.Series, column: str, usable: np.ndarray, impute: ImputePolicy
    ) -> np.ndarray:
        """A date column as days since 1970-01-01 (UTC), NaN where missing or unreadable."""
        days = day_numbers(raw)
        given = raw.notna().to_numpy() & (raw.astype("string").str.strip() != "").to_numpy(
            dtype=bool, na_value=False
        )
        bad = np.isnan(days) & given & usable
        missing = ~given & usable
        hint = "the format is the one of the column's first date; ISO 8601 (2024-01-31) works"
        if impute is ImputePolicy.ERROR:
            self.at(bad, column, f"not a date; fix the file or {IMPUTE_HINT} ({hint})")
            self.at(missing, column, f"missing date; fix the file or {IMPUTE_HINT}")
        else:
            self.at(bad, column, f"not a date, imputed ({hint})", severity=Severity.WARNING)
        days[~usable] = np.nan
        return days

    def at(
        self, mask: np.ndarray, column: str, message: str, *, severity: Severity = Severity.ERROR
    ) -> None:
        """One finding for the rows of ``mask``: the first row, and how many."""
        if mask.any():
            row = int(np.argmax(mask))
            self.add(message, column=column, row=row, count=int(mask.sum()), severity=severity)

    # -- step 5 ----------------------------------------------------------------------------

    def spread(
        self,
        numeric: tuple[str, ...],
        values: np.ndarray,
        categorical: tuple[str, ...],
        text: np.ndarray,
        usable: np.ndarray,
        *,
        warn_binary: bool,
    ) -> None:
        """Warnings for constant columns, and with ``warn_binary`` for two-valued ones."""
        columns: list[tuple[str, np.ndarray]] = [
            (c, values[usable, j][np.isfinite(values[usable, j])]) for j, c in enumerate(numeric)
        ]
        columns += [
            (c, np.array([v for v in text[usable, j] if v is not None], dtype=object))
            for j, c in enumerate(categorical)
        ]
        for column, present in columns:
            distinct = len(pd.unique(present))
            if distinct <= 1:
                self.add(
                    "constant column: it carries no information; exclude it",
                    column=column,
                    severity=Severity.WARNING,
                )
            elif distinct == 2 and warn_binary:
                self.add(
                    "binary column: if it is derived from the label, exclude it",
                    column=column,
                    severity=Severity.WARNING,
                )

    # -- step 4 ----------------------------------------------------------------------------

    def labels(self, frame: pd.DataFrame, spec: TableSpec, usable: np.ndarray) -> np.ndarray:
        """The labels as float64 (class indices where ``classes`` are given); NaN in rows
        without an id."""
        column = str(spec.label_column)
        raw = frame[column]
        if spec.classes is not None:
            text = raw.map(_label_text, na_action="ignore").astype("string").str.strip()
            codes = pd.Index(list(spec.classes)).get_indexer(text.fillna("").to_numpy(object))
            given = text.notna().to_numpy() & (text != "").to_numpy(dtype=bool, na_value=False)
            self.at(~given & usable, column, "missing label")
            self.at(
                given & (codes < 0) & usable,
                column,
                f"a label that is not one of the job's classes {list(spec.classes)}; add it to "
                "[job] classes, or fix the file",
            )
            labels: np.ndarray = codes.astype(np.float64)
        else:
            numbers = pd.to_numeric(raw, errors="coerce")
            labels = numbers.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
            finite = np.isfinite(labels)
            self.at(
                ~finite & usable,
                column,
                "missing or non-numeric label; map text labels to numbers with [job] classes "
                '= ["<first>", "<second>", ...]',
            )
            if spec.binary_labels:
                self.at(
                    finite & ~np.isin(labels, (0.0, 1.0)) & usable,
                    column,
                    "labels must be 0 or 1 (a binary task); map other values with [job] "
                    'classes = ["<neg>", "<pos>"]',
                )
        labels[~usable] = np.nan
        return labels


def _label_text(value: object) -> str:
    """A label as text: integral floats without their ``.0`` (a frame's 1.0 is class "1")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def day_numbers(raw: pd.Series) -> np.ndarray:
    """Dates as days since 1970-01-01 (UTC), fractional for times; NaN where unreadable.

    Text is read as ISO 8601, or else in the one format pandas infers from the column's
    first value; whichever reads more values wins (ISO on a tie).
    """
    if pd.api.types.is_datetime64_any_dtype(raw.dtype):
        stamps = pd.to_datetime(raw, utc=True)
    else:
        text = raw.astype("string").str.strip()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "could not infer format" and the like
            iso = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True)
            if iso.isna().sum() > text.isna().sum():
                try:
                    guessed = pd.to_datetime(text, errors="coerce", utc=True)
                except (ValueError, TypeError):
                    guessed = iso
                if guessed.notna().sum() > iso.notna().sum():
                    iso = guessed
        stamps = iso
    days = (stamps - pd.Timestamp("1970-01-01", tz="UTC")) / pd.Timedelta(days=1)
    return np.array(days.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)


def checked_data(
    spec: TableSpec,
    *,
    warn_binary: bool,
    report: Path | None,
    duplicates: DuplicatePolicy = DuplicatePolicy.ERROR,
) -> DataReport:
    """This party's data checks (:func:`check_table`; repeated ids judged by the alias's PSI
    ``duplicates`` policy): the report written owner-only to ``report``, each warning logged,
    and a :class:`DataError` for the first error (its peer-safe reason names no path, column
    or count)."""
    checks = check_table(spec, warn_binary=warn_binary, duplicates=duplicates)
    if report is not None:
        private_dir(report.parent)
        atomic_write(report, json.dumps(checks.to_json(), indent=1).encode(), mode=0o600)
    for finding in checks.warnings:
        logger.warning("data check: %s", finding.located(checks.source))
    if not checks.ok:
        first = checks.errors[0].located(checks.source)
        more = len(checks.errors) - 1
        where = f"; the whole report is in {report}" if report is not None else ""
        raise DataError(
            f"{first}" + (f" ({more} more problems{where})" if more else where),
            public="its data failed a check (the report stays with its operator)",
        )
    if checks.dropped_ids:
        logger.info(
            "data check: %d rows have no usable id and are left out (docs/protocol.md §3.2)",
            checks.dropped_ids,
        )
    return checks
