"""Two realistic demo silos (a bank and a retailer) cut from the vertical credit data set.

The FATE copy of UCI 'default of credit card clients' comes as a vertical pair that shares
all 30,000 ids (``default_credit_hetero_guest.csv``: ``id,y,x0..x12``;
``default_credit_hetero_host.csv``: ``id,x0..x9``). Real silos overlap only partly and
spell their customers' identifiers differently, so :func:`build_silos` makes:

1. a seeded permutation of the source rows, cut into 20,000 customers of both parties (the
   training population), 5,600 bank-only customers, 2,000 new applicants at the bank and the
   remaining 2,400 retailer-only customers;
2. e-mail-like identifiers ``firstname.lastname12@example.org``: a deterministic function of
   the source id (through its rank among the source ids) and the seed, unique per source
   id, on the reserved ``example.*`` domains (which :mod:`psi.canon` treats like any other
   domain: it has no provider-specific rules such as Gmail's dots);
3. each party's own spelling of them: random letter case and leading/trailing spaces or
   tabs, drawn independently per party, so that the two files' raw strings differ for many
   customers but canonicalise (:func:`psi.canon.canonicalize` with ``IdType.EMAIL``) to the
   same value;
4. the files, each shuffled independently (no shared row order) and written atomically:

   - ``bank_customers.csv``: ``id,y,x0..x12`` for the shared and bank-only customers;
   - ``retailer_customers.csv``: ``id,x0..x9`` for the shared and retailer-only customers
     and 80% of the new applicants (the retailer knows most of them, so they can be scored
     jointly);
   - ``bank_new_customers.csv``: ``id,x0..x12`` of the new applicants, without ``y``;
   - ``new_customers_labels.csv``: ``id,y`` of the new applicants, in the same order and
     spelling as ``bank_new_customers.csv``. This is demo ground truth, not something any
     party would have: only the demo's report reads it, to show how well the scores of new
     applicants rank.

Feature and label values are copied as the source text, unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from protocols.errors import ConfigError, DataError
from protocols.files import atomic_write
from psi.canon import IdType
from vfl.data.datasets import DEFAULT_DATA_DIR, find, read_bytes

logger = logging.getLogger(__name__)

GUEST_SOURCE = "default_credit_hetero_guest.csv"
HOST_SOURCE = "default_credit_hetero_host.csv"
BANK_FILE = "bank_customers.csv"
RETAILER_FILE = "retailer_customers.csv"
NEW_CUSTOMERS_FILE = "bank_new_customers.csv"
NEW_LABELS_FILE = "new_customers_labels.csv"
ID_COLUMN = "id"
LABEL_COLUMN = "y"
GUEST_FEATURES = tuple(f"x{i}" for i in range(13))
HOST_FEATURES = tuple(f"x{i}" for i in range(10))

N_SHARED = 20_000
N_BANK_ONLY = 5_600
N_NEW = 2_000
# retailer-only customers: the rest of the source rows (2,400 of 30,000), at least one
NEW_KNOWN_TO_RETAILER = 0.8

_FIRST = (
    "alice", "amir", "ana", "anna", "ben", "carla", "chen", "chloe", "daniel", "david",
    "elena", "emma", "eric", "fatima", "felix", "grace", "hana", "hugo", "ines", "ivan",
    "jack", "james", "julia", "karin", "kenji", "laura", "leo", "lina", "lucas", "maria",
    "mei", "mia", "noah", "nora", "olga", "omar", "paul", "priya", "rosa", "sam",
    "sara", "sofia", "tom", "vera", "wei", "yara", "yusuf", "zoe",
)  # fmt: skip
_LAST = (
    "adams", "baker", "chang", "costa", "dubois", "evans", "fischer", "garcia", "gupta",
    "hansen", "huang", "ito", "jansen", "kim", "kowalski", "lee", "lopez", "martin", "meyer",
    "moreau", "muller", "nakamura", "nguyen", "novak", "okafor", "olsen", "park", "patel",
    "perez", "rossi", "santos", "schmidt", "silva", "singh", "smith", "sato", "tanaka",
    "taylor", "thomas", "torres", "wagner", "walker", "wang", "weber", "wilson", "wong",
    "yilmaz", "zhang",
)  # fmt: skip
_DOMAINS = ("example.com", "example.org", "example.net")  # RFC 2606 reserved names
_BANK_NOISE = 1
_RETAILER_NOISE = 2


@dataclass(frozen=True)
class SiloFiles:
    """The files :func:`build_silos` wrote and their row counts.

    ``bank_rows = shared + bank_only``; ``retailer_rows = shared + retailer_only +
    new_known_to_retailer``; ``new_labels`` is demo ground truth only (see the module
    docstring).
    """

    bank: Path
    retailer: Path
    new_customers: Path
    new_labels: Path
    bank_rows: int
    retailer_rows: int
    shared: int
    bank_only: int
    retailer_only: int
    new_customers_rows: int
    new_known_to_retailer: int
    id_type: IdType = IdType.EMAIL

    def summary(self) -> dict[str, int]:
        """Counts only (safe to log and to show)."""
        return {
            "bank_rows": self.bank_rows,
            "retailer_rows": self.retailer_rows,
            "shared": self.shared,
            "bank_only": self.bank_only,
            "retailer_only": self.retailer_only,
            "new_customers": self.new_customers_rows,
            "new_known_to_retailer": self.new_known_to_retailer,
        }


def build_silos(*, data_dir: Path, out: Path, seed: int = 0) -> SiloFiles:
    """Write the bank's and the retailer's demo files into ``out`` (steps 1-4 above).

    Parameters
    ----------
    data_dir
        Folder holding ``default_credit_hetero_guest.csv`` and
        ``default_credit_hetero_host.csv``, each plain or as ``.csv.gz`` (``$VFL_DATA_DIR``
        or the bundled ``data/``; see :func:`vfl.data.datasets.data_dir`).
    out
        Output folder, created if missing; existing demo files in it are replaced.
    seed
        Fixes the split, the identifiers, each party's spelling noise and the row orders:
        the same inputs and seed give byte-identical files.

    Returns
    -------
    SiloFiles
        Paths of the four files and their row counts.

    Raises
    ------
    ConfigError
        If ``seed`` is negative.
    DataError
        If a source file is missing, unreadable, lacks a column, has duplicate or
        non-integer ids, if the two files' ids differ, or if they have too few rows.
    """
    _check_seed(seed)
    source_ids, guest = _read_source(data_dir, GUEST_SOURCE, (LABEL_COLUMN, *GUEST_FEATURES))
    host_ids, host_rest = _read_source(data_dir, HOST_SOURCE, HOST_FEATURES)
    n = len(source_ids)
    if len(host_ids) != n or not np.array_equal(np.sort(source_ids), np.sort(host_ids)):
        raise DataError(
            f"{data_dir / GUEST_SOURCE} and {data_dir / HOST_SOURCE} must hold the same ids "
            "(the vertical pair shares all of them); restore the original files "
            "(`vfl data check` verifies them)"
        )
    needed = N_SHARED + N_BANK_ONLY + N_NEW + 1
    if n < needed:
        raise DataError(
            f"{data_dir / GUEST_SOURCE} has {n} rows; the demo split needs at least {needed}; "
            "restore the original file (`vfl data check` verifies it)"
        )
    host = pd.Series(host_rest, index=host_ids).loc[source_ids].to_numpy(dtype=object)
    guest_parts = pd.Series(guest).str.partition(",")
    labels = guest_parts[0].to_numpy(dtype=object)  # row-aligned with ``source_ids``
    guest_features = guest_parts[2].to_numpy(dtype=object)

    # 1. the split, over source rows
    rng = np.random.default_rng([seed, 0])
    perm = rng.permutation(n)
    shared = perm[:N_SHARED]
    bank_only = perm[N_SHARED : N_SHARED + N_BANK_ONLY]
    new = perm[N_SHARED + N_BANK_ONLY : N_SHARED + N_BANK_ONLY + N_NEW]
    retailer_only = perm[N_SHARED + N_BANK_ONLY + N_NEW :]
    n_known = round(NEW_KNOWN_TO_RETAILER * N_NEW)
    new_known = rng.permutation(new)[:n_known]

    # 2. identifiers, 3. each party's spelling
    emails = email_ids(source_ids, seed=seed)
    bank_ids = _noisy(emails, np.random.default_rng([seed, _BANK_NOISE]))
    retailer_ids = _noisy(emails, np.random.default_rng([seed, _RETAILER_NOISE]))

    # 4. the files, each in its own shuffled order
    bank_rows = np.concatenate([shared, bank_only])
    bank_rows = bank_rows[np.random.default_rng([seed, 3]).permutation(len(bank_rows))]
    retailer_rows = np.concatenate([shared, retailer_only, new_known])
    retailer_rows = retailer_rows[np.random.default_rng([seed, 4]).permutation(len(retailer_rows))]
    new_rows = new[np.random.default_rng([seed, 5]).permutation(len(new))]
    out.mkdir(parents=True, exist_ok=True)
    files = SiloFiles(
        bank=out / BANK_FILE,
        retailer=out / RETAILER_FILE,
        new_customers=out / NEW_CUSTOMERS_FILE,
        new_labels=out / NEW_LABELS_FILE,
        bank_rows=len(bank_rows),
        retailer_rows=len(retailer_rows),
        shared=len(shared),
        bank_only=len(bank_only),
        retailer_only=len(retailer_only),
        new_customers_rows=len(new),
        new_known_to_retailer=len(new_known),
    )
    guest_header = (ID_COLUMN, LABEL_COLUMN, *GUEST_FEATURES)
    _write(files.bank, guest_header, bank_ids, guest, bank_rows)
    _write(files.retailer, (ID_COLUMN, *HOST_FEATURES), retailer_ids, host, retailer_rows)
    _write(files.new_customers, (ID_COLUMN, *GUEST_FEATURES), bank_ids, guest_features, new_rows)
    _write(files.new_labels, (ID_COLUMN, LABEL_COLUMN), bank_ids, labels, new_rows)
    logger.info("demo silos written to %s: %s", out, files.summary())
    return files


def email_ids(source_ids: np.ndarray, *, seed: int) -> np.ndarray:
    """E-mail-like identifiers, one per source id, unique, fixed by the id and ``seed``.

    The ids' ranks go through a seeded affine bijection ``(a * rank + b) mod n`` (``a``
    coprime to ``n``), whose value picks a first name, a last name, a number and a domain;
    distinct source ids therefore always get distinct addresses. All are lower case.

    Parameters
    ----------
    source_ids
        Unique integer ids.
    seed
        Selects the bijection.

    Returns
    -------
    numpy.ndarray
        Object array of strings, aligned with ``source_ids``.

    Raises
    ------
    ConfigError
        If ``seed`` is negative.
    DataError
        If ``source_ids`` holds a duplicate.
    """
    _check_seed(seed)
    ids = np.asarray(source_ids)
    n = len(ids)
    if n == 0:
        return np.empty(0, dtype=object)
    sorted_ids = np.unique(ids)
    if len(sorted_ids) != n:
        raise DataError("source ids must be unique to derive one e-mail address per customer")
    rank = np.searchsorted(sorted_ids, ids).astype(np.int64)
    rng = np.random.default_rng([seed, 6])
    while True:
        a = int(rng.integers(1, max(n, 2)))
        if np.gcd(a, n) == 1:
            break
    b = int(rng.integers(0, n))
    code = (a * rank + b) % n
    n_first, n_last = len(_FIRST), len(_LAST)
    first = np.asarray(_FIRST, dtype=object)[code % n_first]
    last = np.asarray(_LAST, dtype=object)[(code // n_first) % n_last]
    number = code // (n_first * n_last)
    # The domain is a function of the code too, but not part of uniqueness: the local part
    # (first, last, number) is already unique.
    domain = np.asarray(_DOMAINS, dtype=object)[(code * 7 + seed) % len(_DOMAINS)]
    digits = pd.Series(number).map(lambda k: str(k) if k else "").to_numpy(dtype=object)
    local = pd.Series(first) + "." + pd.Series(last) + pd.Series(digits)
    emails: np.ndarray = (local + "@" + pd.Series(domain)).to_numpy(dtype=object)
    return emails


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError("the demo seed must be a non-negative integer")


def _noisy(emails: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One party's spelling: letter case and surrounding whitespace (step 3)."""
    s = pd.Series(emails, dtype=object)
    style = rng.choice(4, size=len(s), p=[0.55, 0.1, 0.25, 0.1])
    s = s.where(style != 1, s.str.upper())
    s = s.where(style != 2, s.str.title())
    mixed = np.flatnonzero(style == 3)
    if len(mixed):
        flips = rng.random((len(mixed), max(len(e) for e in emails[mixed]))) < 0.5
        s.iloc[mixed] = [
            "".join(c.upper() if f else c for c, f in zip(e, row, strict=False))
            for e, row in zip(s.iloc[mixed], flips, strict=True)
        ]
    pads = np.array(["", " ", "  ", "\t"], dtype=object)
    lead = pads[rng.choice(4, size=len(s), p=[0.85, 0.08, 0.03, 0.04])]
    trail = pads[rng.choice(4, size=len(s), p=[0.85, 0.08, 0.03, 0.04])]
    spelled: np.ndarray = (pd.Series(lead) + s + pd.Series(trail)).to_numpy(dtype=object)
    return spelled


def _read_source(
    folder: Path, name: str, columns: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The integer ids of ``folder/name`` and, per row, the text after the id (unchanged)."""
    path = find(name, folder=folder)
    if not path.is_file():
        raise DataError(
            f"demo source {name} (or {name}.gz) not found in {folder}; unset VFL_DATA_DIR to "
            f"use the copies bundled in {DEFAULT_DATA_DIR}, or set it to the folder holding "
            "the real data sets, and run `vfl data check`"
        )
    try:
        lines = read_bytes(path).decode("utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as exc:
        raise DataError(
            f"{path}: cannot be read as UTF-8 text ({type(exc).__name__}); `vfl data check` "
            "verifies the data sets"
        ) from None
    expected = ",".join((ID_COLUMN, *columns))
    if not lines or lines[0].strip() != expected:
        raise DataError(
            f"{path}: expected the header {expected!r}, found columns "
            f"{lines[0].strip().split(',') if lines else []}; restore the original file "
            "(`vfl data check` verifies it)"
        )
    body = pd.Series([line for line in lines[1:] if line.strip()], dtype=object)
    parts = body.str.partition(",")
    rest = parts[2]
    short = (rest.str.count(",") != len(columns) - 1).to_numpy()
    if short.any():
        raise DataError(
            f"{path} row {int(np.argmax(short))}: expected {len(columns) + 1} columns; "
            "restore the original file (`vfl data check` verifies it)"
        )
    numeric = pd.to_numeric(parts[0], errors="coerce")
    bad = (numeric.isna() | (numeric != numeric.round())).to_numpy()
    if bad.any():
        raise DataError(
            f"{path} row {int(np.argmax(bad))}, column {ID_COLUMN!r}: not an integer id"
        )
    ids = numeric.to_numpy(dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: column {ID_COLUMN!r} holds duplicate ids")
    return ids, rest.to_numpy(dtype=object)


def _write(
    path: Path, header: tuple[str, ...], ids: np.ndarray, payload: np.ndarray, rows: np.ndarray
) -> None:
    """``header`` then ``ids[r],payload[r]`` for each ``r`` in ``rows``, atomically."""
    body = pd.Series(ids[rows], dtype=object) + "," + pd.Series(payload[rows], dtype=object)
    text = ",".join(header) + "\n" + "\n".join(body.tolist()) + "\n"
    atomic_write(path, text.encode("utf-8"))
