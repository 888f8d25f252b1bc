"""Identifier canonicalisation, rejection and deduplication (docs/protocol.md §3.2).

Both parties run this locally, before anything is hashed or sent:

1. decode UTF-8 (reject invalid), Unicode NFKC, strip surrounding whitespace;
2. type rules: ``email`` casefold and ``^[^@\\s]+@[^@\\s]+$``; ``phone`` E.164
   ``^\\+[1-9][0-9]{6,14}$`` after removing spaces, dashes, dots and parentheses;
   ``national_id`` spaces/hyphens removed, upper-case; ``generic`` nothing more;
3. reject empty, longer than 256 bytes, containing a control character (Unicode ``Cc``),
   or failing the type's pattern; rejected rows are counted per reason and never sent;
4. encode ``c = id_type ‖ ":" ‖ canonical_utf8``;
5. deduplicate: a canonical id held by several rows is an error by default, or keeps
   the ``first`` row, or the ``latest`` by a named timestamp column.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from protocols.errors import AlignmentError, ConfigError, DataError

CANON_VERSION = 1
MAX_ID_BYTES = 256

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_PHONE = re.compile(r"^\+[1-9][0-9]{6,14}$")
_PHONE_NOISE = re.compile(r"[\s\-().]")
_NATIONAL_NOISE = re.compile(r"[\s\-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


class IdType(StrEnum):
    """How identifiers are canonicalised (agreed in the PSI setup)."""

    EMAIL = "email"
    PHONE = "phone"
    NATIONAL_ID = "national_id"
    GENERIC = "generic"


class RejectReason(StrEnum):
    """Why an identifier was not used."""

    MISSING = "missing"
    INVALID_UTF8 = "invalid_utf8"
    EMPTY = "empty"
    TOO_LONG = "too_long"
    CONTROL_CHARACTER = "control_character"
    PATTERN = "pattern"


class DuplicatePolicy(StrEnum):
    """What to do with several rows sharing one canonical id."""

    ERROR = "error"
    FIRST = "first"
    LATEST = "latest"


def canonicalize(value: object, id_type: IdType) -> str | RejectReason:
    """Steps 1-3 for one value: the canonical string, or why it is rejected."""
    if value is None or (isinstance(value, float) and value != value):
        return RejectReason.MISSING
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return RejectReason.INVALID_UTF8
    text = str(value)
    if not text.isascii():  # NFKC leaves ASCII unchanged: skip it on the common path
        text = unicodedata.normalize("NFKC", text)
    text = text.strip()
    if _CONTROL.search(text):
        return RejectReason.CONTROL_CHARACTER
    if id_type is IdType.EMAIL:
        text = text.casefold()
        pattern = _EMAIL
    elif id_type is IdType.PHONE:
        text = _PHONE_NOISE.sub("", text)
        pattern = _PHONE
    elif id_type is IdType.NATIONAL_ID:
        text = _NATIONAL_NOISE.sub("", text).upper()
        pattern = None
    else:
        pattern = None
    if not text:
        return RejectReason.EMPTY
    if len(text.encode("utf-8")) > MAX_ID_BYTES:
        return RejectReason.TOO_LONG
    if pattern is not None and not pattern.match(text):
        return RejectReason.PATTERN
    return text


@dataclass(frozen=True)
class PreparedIds:
    """A party's identifiers ready for PSI.

    ``canonical[i]`` is the encoded ``c`` of step 4 for input row ``rows[i]``; every
    ``canonical`` value is unique.
    """

    id_type: IdType
    canonical: list[bytes]
    rows: np.ndarray
    n_input: int
    rejected: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0

    def summary(self) -> dict[str, object]:
        """Counts only (safe to log and to show)."""
        return {
            "input_rows": self.n_input,
            "usable_ids": len(self.canonical),
            "rejected": dict(self.rejected),
            "duplicate_rows_dropped": self.duplicates,
        }


def prepare_ids(
    ids: Sequence[object],
    *,
    id_type: IdType,
    duplicates: DuplicatePolicy = DuplicatePolicy.ERROR,
    timestamps: Sequence[object] | None = None,
    column: str = "id",
    source: str = "input",
) -> PreparedIds:
    """Steps 1-5 for a whole column; errors name ``source``, ``column`` and an example row."""
    if duplicates is DuplicatePolicy.LATEST and timestamps is None:
        raise ConfigError("duplicates='latest' needs a timestamp column")
    if timestamps is not None and len(timestamps) != len(ids):
        raise ConfigError("the timestamp column must have one value per id")
    prefix = f"{id_type.value}:".encode()
    rejected: dict[str, int] = {}
    chosen: dict[bytes, int] = {}
    dropped = 0
    for row, value in enumerate(ids):
        canon = canonicalize(value, id_type)
        if isinstance(canon, RejectReason):
            rejected[canon.value] = rejected.get(canon.value, 0) + 1
            continue
        c = prefix + canon.encode("utf-8")
        held = chosen.get(c)
        if held is None:
            chosen[c] = row
            continue
        if duplicates is DuplicatePolicy.ERROR:
            raise DataError(
                f"{source}, column {column!r}: row {row} has the same canonical id as row "
                f"{held}; clean the data, or choose duplicates='first' or 'latest' "
                "(with a timestamp column)",
                public=f"the data has duplicate ids (duplicates policy '{duplicates.value}')",
            )
        dropped += 1
        later = duplicates is DuplicatePolicy.LATEST and timestamps is not None
        if later and _later(timestamps[row], timestamps[held], source=source, row=row):  # type: ignore[index]
            chosen[c] = row
    canonical = list(chosen)
    rows = np.fromiter((chosen[c] for c in canonical), dtype=np.int64, count=len(canonical))
    if not canonical:
        raise AlignmentError(
            f"{source}, column {column!r}: no usable identifiers ({rejected})",
            public="the id column holds no usable identifiers",
        )
    return PreparedIds(
        id_type=id_type,
        canonical=canonical,
        rows=rows,
        n_input=len(ids),
        rejected=rejected,
        duplicates=dropped,
    )


def _later(a: object, b: object, *, source: str, row: int) -> bool:
    try:
        return bool(a > b)  # type: ignore[operator]
    except TypeError:
        raise DataError(
            f"{source}: timestamp of row {row} cannot be compared",
            public="the timestamp column holds values that cannot be compared",
        ) from None
