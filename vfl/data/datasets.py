"""The real data sets: bundled in ``<repo>/data`` as ``.csv.gz``, or in ``$VFL_DATA_DIR``.

A data set is named by its CSV file name (``breast_hetero_guest.csv``); in the folder it is
found as that name or as the name plus ``.gz`` (pandas reads both). Its uncompressed content
is checked against the sha256 list in the folder's README.md before use, so a truncated or
edited copy is caught with a message that says where the files come from.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from protocols.errors import DataError

ENV_VAR = "VFL_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / "data"
GZ_SUFFIX = ".gz"
SOURCE = (
    "copies of the FATE project's example data (github.com/FederatedAI/FATE, examples/data, "
    "commit ea550db8; UCI Breast Cancer Wisconsin and UCI 'default of credit card clients'), "
    f"bundled in {DEFAULT_DATA_DIR} (see its README.md)"
)
_SHA_LINE = re.compile(r"^([0-9a-f]{64})\s+(\S+)\s*$")


@dataclass(frozen=True)
class DataSet:
    """A verified data file: ``path`` is ``name`` or ``name.gz``; ``sha256`` and ``size``
    are those of the uncompressed content."""

    name: str
    path: Path
    sha256: str
    size: int


def data_dir(environ: Mapping[str, str]) -> Path:
    """The data folder: ``$VFL_DATA_DIR`` or the bundled ``<repo>/data``."""
    value = environ.get(ENV_VAR)
    return Path(value).expanduser().resolve() if value else DEFAULT_DATA_DIR


def find(name: str, *, folder: Path) -> Path:
    """``folder/name`` if it is a file, else ``folder/name.gz`` if that is one.

    Neither: ``folder/name`` (for the caller's "not found" message). Any file name works, so
    that code given a folder of plain CSV files and a folder of compressed ones alike can
    name the files the same way.
    """
    plain = folder / name
    if plain.is_file() or name.endswith(GZ_SUFFIX):
        return plain
    packed = folder / (name + GZ_SUFFIX)
    return packed if packed.is_file() else plain


def read_bytes(path: Path) -> bytes:
    """The content of ``path``, decompressed if its name ends in ``.gz``."""
    if path.name.endswith(GZ_SUFFIX):
        try:
            with gzip.open(path, "rb") as handle:
                return handle.read()
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"{path}: not a readable gzip file ({type(exc).__name__}); restore it ({SOURCE})"
            ) from None
    return path.read_bytes()


def expected_hashes(folder: Path) -> dict[str, str]:
    """Data set name -> sha256 of its uncompressed content, from ``folder``'s README.md.

    Lines naming ``.gz`` files (the sums of the compressed files, also listed in the bundled
    README) are not data set names and are left out.
    """
    readme = folder / "README.md"
    if not readme.is_file():
        raise DataError(
            f"no data sets at {folder} (expected {readme} with their sha256 list). Unset "
            f"{ENV_VAR} to use the copies bundled with the repository, or set it to a folder "
            f"holding the files (.csv or .csv.gz) and that README; they are {SOURCE}"
        )
    hashes = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        match = _SHA_LINE.match(line.strip())
        if match and not match.group(2).endswith(GZ_SUFFIX):
            hashes[match.group(2)] = match.group(1)
    if not hashes:
        raise DataError(f"{readme} lists no sha256 sums; is {folder} the right data folder?")
    return hashes


def verify(name: str, *, folder: Path) -> DataSet:
    """Check ``folder/name`` (or ``folder/name.gz``) against its listed sha256; return it."""
    hashes = expected_hashes(folder)
    if name not in hashes:
        raise DataError(
            f"{name!r} is not one of the data sets listed in {folder / 'README.md'} "
            f"({', '.join(sorted(hashes))})"
        )
    path = find(name, folder=folder)
    if not path.is_file():
        raise DataError(
            f"data set {name} not found at {path} (nor {path.name}{GZ_SUFFIX}) in {folder}; "
            f"restore it there, or set {ENV_VAR} to the folder holding it ({SOURCE})"
        )
    content = read_bytes(path)
    actual = hashlib.sha256(content).hexdigest()
    if actual != hashes[name]:
        raise DataError(
            f"{path} has content sha256 {actual[:16]}..., expected {hashes[name][:16]}... "
            f"from {folder / 'README.md'}: the file is modified or truncated; restore it "
            f"({SOURCE})"
        )
    return DataSet(name=name, path=path, sha256=actual, size=len(content))


def verify_all(*, folder: Path) -> list[DataSet]:
    """Verify every data set listed in the folder's README."""
    return [verify(name, folder=folder) for name in sorted(expected_hashes(folder))]
