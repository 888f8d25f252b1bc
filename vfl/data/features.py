"""Which columns of a party's table are features, and how each kind is turned into numbers.

A :class:`FeatureSpec` says which columns are used (every column but the id, the label and
``exclude_columns``, or exactly ``feature_columns``), which of them hold categories and
how they are encoded (:class:`Encoding`), which hold dates, and what to do with missing
values (:class:`ImputePolicy`). Jobs write it as a TOML table (:meth:`FeatureSpec.parse`);
a trained model keeps it as canonical JSON (:meth:`FeatureSpec.to_json`) so scoring loads
the same columns the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocols.errors import ConfigError

MAX_CATEGORIES = 1000  # the one-hot cap's largest value (a peer's spec cannot ask for more)
MAX_NAMES = 10_000  # the most column names one list of a spec may hold


class ImputePolicy(StrEnum):
    """What to do with missing or infinite feature values (and missing dates)."""

    ERROR = "error"
    MEAN = "mean"
    MEDIAN = "median"
    ZERO = "zero"


class Encoding(StrEnum):
    """How a categorical column becomes numbers (fitted on the training rows only)."""

    ONEHOT = "onehot"
    ORDINAL = "ordinal"
    FREQUENCY = "frequency"


KEYS = (
    "feature_columns",
    "exclude_columns",
    "categorical",
    "date_columns",
    "max_categories",
    "impute",
)


@dataclass(frozen=True)
class FeatureSpec:
    """The feature columns of a table and how each is encoded.

    Parameters
    ----------
    feature_columns
        The feature columns, in this order; ``None``: every column of the file but the id,
        the label and ``exclude_columns``, in the file's order.
    exclude_columns
        Columns that are never features (with ``feature_columns = None``: every other
        column but the id and the label is one).
    categorical
        ``(column, encoding)`` pairs sorted by column: columns holding categories.
    date_columns
        Columns holding dates.
    max_categories
        One-hot cap: the ``max_categories - 1`` most frequent categories of the training
        rows get a column each, the others (and unseen or missing values) share ``<other>``.
    impute
        Missing or infinite numbers and missing dates: an error, or filled with the
        training rows' mean, median, or zero.
    """

    feature_columns: tuple[str, ...] | None = None
    exclude_columns: tuple[str, ...] = ()
    categorical: tuple[tuple[str, Encoding], ...] = ()
    date_columns: tuple[str, ...] = ()
    max_categories: int = 20
    impute: ImputePolicy = ImputePolicy.ERROR

    def __post_init__(self) -> None:
        _coerce_enums(self)
        problem = _problem(self)
        if problem is not None:
            raise ConfigError(problem)

    @property
    def categorical_columns(self) -> tuple[str, ...]:
        """The categorical columns, sorted."""
        return tuple(column for column, _ in self.categorical)

    def encoding(self, column: str) -> Encoding | None:
        """The encoding of ``column``, or None if it is not categorical."""
        return dict(self.categorical).get(column)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, where: str) -> FeatureSpec:
        """A spec from a TOML table (every key optional); errors name ``where`` and the key.

        Parameters
        ----------
        raw
            ``feature_columns``, ``exclude_columns`` and ``date_columns`` (lists of column
            names), ``categorical`` (a list of column names, one-hot encoded, or a table
            ``{column = "onehot" | "ordinal" | "frequency"}``), ``max_categories`` (an
            integer of at least 2) and ``impute`` (``"error"``, ``"mean"``, ``"median"``
            or ``"zero"``).
        where
            What the table is, for error messages (e.g. ``"job.toml [features]"``).

        Raises
        ------
        ConfigError
            An unknown key, a value of the wrong type, or contradicting keys (a column
            both categorical and a date, or both excluded and listed as a feature).
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must be a table")
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
        listed = raw.get("feature_columns")
        max_categories = raw.get("max_categories", 20)
        if not isinstance(max_categories, int) or isinstance(max_categories, bool):
            raise ConfigError(f"{where}: max_categories must be an integer (at least 2)")
        impute = raw.get("impute", ImputePolicy.ERROR.value)
        choices = ", ".join(repr(p.value) for p in ImputePolicy)
        if not isinstance(impute, str) or impute not in set(ImputePolicy):
            raise ConfigError(f"{where}: impute must be one of {choices}")
        try:
            return cls(
                feature_columns=None
                if listed is None
                else _names(listed, where, "feature_columns"),
                exclude_columns=_names(raw.get("exclude_columns", []), where, "exclude_columns"),
                categorical=_categorical(raw.get("categorical", []), where),
                date_columns=_names(raw.get("date_columns", []), where, "date_columns"),
                max_categories=max_categories,
                impute=ImputePolicy(impute),
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON, every key written; :meth:`parse` reads it back to an equal spec."""
        return {
            "feature_columns": None if self.feature_columns is None else list(self.feature_columns),
            "exclude_columns": list(self.exclude_columns),
            "categorical": {column: encoding.value for column, encoding in self.categorical},
            "date_columns": list(self.date_columns),
            "max_categories": self.max_categories,
            "impute": self.impute.value,
        }


def _names(value: object, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, list | tuple) and len(value) > MAX_NAMES:
        raise ConfigError(f"{where}: {key} names more than {MAX_NAMES} columns")
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, str) and v.strip() for v in value
    ):
        raise ConfigError(f"{where}: {key} must be a list of column names")
    return tuple(value)


def _categorical(value: object, where: str) -> tuple[tuple[str, Encoding], ...]:
    if isinstance(value, Mapping) and len(value) > MAX_NAMES:
        raise ConfigError(f"{where}: categorical names more than {MAX_NAMES} columns")
    if isinstance(value, Mapping):
        choices = ", ".join(repr(e.value) for e in Encoding)
        pairs = []
        for column, encoding in value.items():
            if not isinstance(column, str) or not column.strip():
                raise ConfigError(f"{where}: categorical keys must be column names")
            if not isinstance(encoding, str) or encoding not in set(Encoding):
                raise ConfigError(
                    f"{where}: categorical column {column!r}: the encoding must be one of {choices}"
                )
            pairs.append((column, Encoding(encoding)))
    else:
        pairs = [(c, Encoding.ONEHOT) for c in _names(value, where, "categorical")]
    return tuple(sorted(pairs))


def _coerce_enums(spec: FeatureSpec) -> None:
    """Encodings and the imputation policy given as text (``("city", "onehot")``) become
    their enums, so a spec built in Python works as a parsed one does."""
    choices = ", ".join(repr(e.value) for e in Encoding)
    pairs = []
    for pair in spec.categorical:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ConfigError(f"categorical must hold (column, encoding) pairs, not {pair!r}")
        column, encoding = pair
        if not isinstance(encoding, str) or encoding not in set(Encoding):
            raise ConfigError(
                f"categorical column {column!r}: the encoding must be one of {choices}"
            )
        pairs.append((column, Encoding(encoding)))
    object.__setattr__(spec, "categorical", tuple(pairs))
    if not isinstance(spec.impute, str) or spec.impute not in set(ImputePolicy):
        policies = ", ".join(repr(p.value) for p in ImputePolicy)
        raise ConfigError(f"impute must be one of {policies}")
    object.__setattr__(spec, "impute", ImputePolicy(spec.impute))


def _problem(spec: FeatureSpec) -> str | None:
    """What contradicts itself in ``spec``, or None."""
    if (
        not isinstance(spec.max_categories, int)
        or isinstance(spec.max_categories, bool)
        or not 2 <= spec.max_categories <= MAX_CATEGORIES
    ):
        return f"max_categories must be an integer from 2 to {MAX_CATEGORIES}"
    lists: dict[str, tuple[str, ...]] = {
        "feature_columns": spec.feature_columns or (),
        "exclude_columns": spec.exclude_columns,
        "categorical": spec.categorical_columns,
        "date_columns": spec.date_columns,
    }
    for key, names in lists.items():
        if len(names) > MAX_NAMES:
            return f"{key} names more than {MAX_NAMES} columns"
        repeated = sorted(c for c, n in Counter(names).items() if n > 1)
        if repeated:
            return f"{key} names column {repeated[0]!r} twice"
    if list(spec.categorical) != sorted(spec.categorical):
        return "categorical must be sorted by column"
    both = sorted(set(spec.categorical_columns) & set(spec.date_columns))
    if both:
        return f"column {both[0]!r} is both categorical and a date column"
    for key in ("feature_columns", "categorical", "date_columns"):
        excluded = sorted(set(lists[key]) & set(spec.exclude_columns))
        if excluded:
            return f"column {excluded[0]!r} is in exclude_columns and in {key}"
    return None
