"""A table's features as one float64 matrix: encoders, imputation and standard scaling, fitted
on the training rows only and saved with the model as plain JSON (never pickled).

Every input column gives one or more output columns, in the order of the input columns:

* a numeric column ``x``: ``x``;
* a categorical column ``city``, by its :class:`~vfl.data.features.Encoding`:

  - ``onehot``: ``city=<value>`` for each of the ``max_categories - 1`` most frequent
    categories of the training rows (ties by value), then ``city=<other>`` for the rest,
    unseen and missing values;
  - ``ordinal``: ``city:ordinal``, the category's position among the training rows'
    categories sorted (-1: unseen or missing);
  - ``frequency``: ``city:frequency``, the category's share of the training rows (0: unseen
    or missing);

* a date column ``opened``: ``opened:age_days`` (days before the latest date of the
  training rows, the reference date), ``opened:dow`` (day of week, Monday 0) and
  ``opened:month`` (1-12), in UTC.

Then every output column is imputed (missing numbers and dates, by the table's
:class:`~vfl.data.features.ImputePolicy`: the training rows' mean, median or zero; the mean
under ``error``, which leaves nothing to impute) and standard-scaled with the training rows'
mean and standard deviation (1 where it is 0). All of it is float64 arithmetic in a fixed
order: the same table gives the same matrix, bit for bit. Load-time checks bound every
value (:data:`vfl.data.checks.MAX_ABS`), so no scaled value overflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from protocols.errors import ConfigError, DataError
from vfl.data.features import Encoding, FeatureSpec, ImputePolicy
from vfl.data.tables import PartyTable

OTHER = "<other>"
DATE_PARTS = ("age_days", "dow", "month")
FORMAT = 2  # of :meth:`Preprocessor.to_json`; 1 (numeric columns only) had no "format"


@dataclass(frozen=True)
class CategoryCode:
    """A categorical column's encoder: its categories (in output order) and their shares."""

    column: str
    encoding: Encoding
    categories: tuple[str, ...]
    shares: tuple[float, ...] = ()  # ``frequency`` only, one per category

    @classmethod
    def fit(
        cls, column: str, encoding: Encoding, values: np.ndarray, *, max_categories: int
    ) -> CategoryCode:
        """The encoder of ``values`` (the training rows; None: missing)."""
        counts = pd.Series(values, dtype=object).value_counts(dropna=True)
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        if encoding is Encoding.ONEHOT:
            kept = tuple(str(v) for v, _ in ordered[: max_categories - 1])
            return cls(column, encoding, kept)
        names = tuple(sorted(str(v) for v in counts.index))
        if encoding is Encoding.ORDINAL:
            return cls(column, encoding, names)
        total = len(values)
        return cls(column, encoding, names, tuple(float(counts[v]) / total for v in names))

    @property
    def outputs(self) -> tuple[str, ...]:
        """The output column names."""
        if self.encoding is Encoding.ONEHOT:
            return tuple(f"{self.column}={c}" for c in (*self.categories, OTHER))
        return (f"{self.column}:{self.encoding.value}",)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """``values`` (None: missing) as ``len(values) × len(outputs)`` float64."""
        codes: np.ndarray = pd.Index(list(self.categories), dtype=object).get_indexer(
            pd.Index(values, dtype=object)
        )
        if self.encoding is Encoding.ONEHOT:
            out = np.zeros((len(values), len(self.categories) + 1))
            out[np.arange(len(values)), np.where(codes < 0, len(self.categories), codes)] = 1.0
            return out
        if self.encoding is Encoding.ORDINAL:
            ordinal: np.ndarray = codes.astype(np.float64).reshape(-1, 1)
            return ordinal
        shares = np.append(np.array(self.shares, dtype=np.float64), 0.0)
        frequency: np.ndarray = shares[codes].reshape(-1, 1)  # code -1: the appended 0
        return frequency

    def to_json(self) -> dict[str, Any]:
        """Plain JSON."""
        return {
            "column": self.column,
            "encoding": self.encoding.value,
            "categories": list(self.categories),
            "shares": list(self.shares),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CategoryCode:
        """Read what :meth:`to_json` wrote."""
        return cls(
            column=str(obj["column"]),
            encoding=Encoding(obj["encoding"]),
            categories=tuple(str(c) for c in obj["categories"]),
            shares=tuple(float(s) for s in obj["shares"]),
        )


def date_parts(days: np.ndarray, reference: float) -> np.ndarray:
    """Age in days before ``reference``, day of week (Monday 0) and month (1-12) of
    ``days`` (days since 1970-01-01, NaN: missing), as ``len(days) × 3`` float64."""
    missing = np.isnan(days)
    whole = np.floor(np.where(missing, 0.0, days)).astype(np.int64)
    dow = (whole + 3) % 7  # 1970-01-01 was a Thursday
    month = whole.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12 + 1
    out = np.column_stack([reference - days, dow, month]).astype(np.float64)
    out[missing] = np.nan
    return out


@dataclass(frozen=True)
class Preprocessor:
    """Encoders, imputation and standard scaling fitted on training rows (module docstring).

    ``spec`` is what to load at scoring time (``spec.feature_columns``: the input columns);
    ``fill``, ``mean`` and ``scale`` have one value per output column.
    """

    spec: FeatureSpec
    codes: tuple[CategoryCode, ...]
    references: tuple[float, ...]  # per date column of ``spec``: the reference day
    fill: tuple[float, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]

    @property
    def input_columns(self) -> tuple[str, ...]:
        """The raw columns it reads, in order."""
        return self.spec.feature_columns or ()

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        """The input columns read as numbers."""
        other = set(self.spec.categorical_columns) | set(self.spec.date_columns)
        return tuple(c for c in self.input_columns if c not in other)

    @property
    def output_columns(self) -> tuple[str, ...]:
        """The names of the columns :meth:`transform` returns."""
        codes = {c.column: c for c in self.codes}
        out: list[str] = []
        for column in self.input_columns:
            if column in codes:
                out += codes[column].outputs
            elif column in self.spec.date_columns:
                out += [f"{column}:{part}" for part in DATE_PARTS]
            else:
                out.append(column)
        return tuple(out)

    @classmethod
    def fit(cls, table: PartyTable, rows: np.ndarray) -> Preprocessor:
        """Learn encoders, fill values, means and scales from ``rows`` of ``table`` (the
        impute policy is ``table.spec``'s)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            raise ConfigError("cannot fit preprocessing on zero training rows")
        spec = _resolved(table)
        codes = tuple(
            CategoryCode.fit(
                column,
                encoding,
                _column(table.text, table.text_columns, column, table)[rows],
                max_categories=spec.max_categories,
            )
            for column, encoding in spec.categorical
        )
        references = []
        for column in spec.date_columns:
            days = _column(table.days, table.date_columns, column, table)[rows]
            seen = days[~np.isnan(days)]
            references.append(float(seen.max()) if len(seen) else 0.0)
        draft = cls(spec, codes, tuple(references), (), (), ())
        names = draft.output_columns
        if len(set(names)) != len(names):
            repeated = sorted({c.split("=")[0] for c in names if names.count(c) > 1})
            raise DataError(
                f"{table.source}: two encoded columns of {repeated} would have the same name (a "
                "category named like another column's output?); rename the category or column"
            )
        x = draft._expand(table)[rows]
        with np.errstate(all="ignore"):
            if spec.impute is ImputePolicy.MEDIAN:
                fill = np.nanmedian(x, axis=0)
            elif spec.impute is ImputePolicy.ZERO:
                fill = np.zeros(x.shape[1])
            else:
                fill = np.nanmean(x, axis=0)
        fill = np.where(np.isfinite(fill), fill, 0.0)
        filled = np.where(np.isnan(x), fill, x)
        mean = filled.mean(axis=0)
        scale = filled.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        return cls(
            spec=spec,
            codes=codes,
            references=tuple(references),
            fill=tuple(map(float, fill)),
            mean=tuple(map(float, mean)),
            scale=tuple(map(float, scale)),
        )

    def _expand(self, table: PartyTable) -> np.ndarray:
        """The output columns before imputation and scaling (NaN: missing)."""
        codes = {c.column: c for c in self.codes}
        dates = dict(zip(self.spec.date_columns, self.references, strict=True))
        numeric = {c: j for j, c in enumerate(table.columns)}
        parts: list[np.ndarray] = []
        for column in self.input_columns:
            if column in codes:
                text = _column(table.text, table.text_columns, column, table)
                parts.append(codes[column].encode(text))
            elif column in dates:
                days = _column(table.days, table.date_columns, column, table)
                parts.append(date_parts(days, dates[column]))
            elif column in numeric:
                parts.append(table.features[:, numeric[column] : numeric[column] + 1])
            else:
                raise _missing(table, column)
        return np.hstack(parts).astype(np.float64) if parts else np.zeros((len(table), 0))

    def transform(self, table: PartyTable) -> np.ndarray:
        """Encode, impute and scale every row of ``table``: ``n × len(output_columns)``."""
        if table.columns != self.numeric_columns:
            raise DataError(
                f"{table.source}: numeric columns {table.columns} differ from the model's "
                f"{self.numeric_columns}"
            )
        x = self._expand(table)
        x = np.where(np.isnan(x), np.array(self.fill), x)
        out: np.ndarray = (x - np.array(self.mean)) / np.array(self.scale)
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain JSON to save with the model (``columns``: the output columns)."""
        return {
            "format": FORMAT,
            "spec": self.spec.to_json(),
            "codes": [c.to_json() for c in self.codes],
            "references": list(self.references),
            "columns": list(self.output_columns),
            "fill": list(self.fill),
            "mean": list(self.mean),
            "scale": list(self.scale),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Preprocessor:
        """Read what :meth:`to_json` wrote, or the numeric-only format of earlier versions
        (``columns``, ``fill``, ``mean``, ``scale``), checking its shape."""
        try:
            if "format" not in obj:  # format 1: numeric columns only, errors on missing
                spec = FeatureSpec(feature_columns=tuple(str(c) for c in obj["columns"]))
                codes: tuple[CategoryCode, ...] = ()
                references: tuple[float, ...] = ()
            elif obj["format"] == FORMAT:
                spec = FeatureSpec.parse(obj["spec"], where="preprocessing spec")
                codes = tuple(CategoryCode.from_json(c) for c in obj["codes"])
                references = tuple(float(r) for r in obj["references"])
            else:
                raise ValueError(f"unknown format {obj['format']!r}")
            out = cls(
                spec=spec,
                codes=codes,
                references=references,
                fill=tuple(float(v) for v in obj["fill"]),
                mean=tuple(float(v) for v in obj["mean"]),
                scale=tuple(float(v) for v in obj["scale"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"preprocessing parameters are malformed: {exc}") from None
        width = len(out.output_columns)
        if spec.feature_columns is None or not (
            width == len(out.fill) == len(out.mean) == len(out.scale)
            and [c.column for c in codes] == list(spec.categorical_columns)
            and len(references) == len(spec.date_columns)
        ):
            raise DataError("preprocessing parameters have inconsistent lengths")
        return out


def widest(table: PartyTable) -> int:
    """The most columns :meth:`Preprocessor.fit` can make of ``table``, whichever rows it is
    fitted on: a numeric column 1, a one-hot column ``max_categories``, an ordinal or
    frequency column 1, a date 3. A peer's size check uses this, never the width fitted on
    the rows it chose (that would tell it whether those rows share categories,
    docs/protocol.md §4.4.3)."""
    spec = _resolved(table)
    onehot = sum(spec.encoding(c) is Encoding.ONEHOT for c in table.text_columns)
    return (
        len(table.columns)
        + onehot * spec.max_categories
        + (len(table.text_columns) - onehot)
        + 3 * len(table.date_columns)
    )


def _resolved(table: PartyTable) -> FeatureSpec:
    """``table.spec`` with ``feature_columns`` set (tables built in memory leave it None)."""
    spec = table.spec
    if spec.feature_columns is not None:
        return spec
    return FeatureSpec(
        feature_columns=table.input_columns,
        categorical=tuple(
            sorted((c, spec.encoding(c) or Encoding.ONEHOT) for c in table.text_columns)
        ),
        date_columns=table.date_columns,
        max_categories=spec.max_categories,
        impute=spec.impute,
    )


def _column(
    matrix: np.ndarray | None, names: tuple[str, ...], column: str, table: PartyTable
) -> np.ndarray:
    """Column ``column`` of ``matrix`` (whose columns are ``names``)."""
    if matrix is None or column not in names:
        raise _missing(table, column)
    return np.asarray(matrix[:, names.index(column)])


def _missing(table: PartyTable, column: str) -> DataError:
    return DataError(
        f"{table.source}: no column {column!r} of the kind the model reads (numeric, "
        "categorical or date: the model's feature spec)"
    )
