"""The real data sets in ``VFL_DATA_DIR`` (default ``../shared/data`` beside the repository).

Files are checked against the sha256 list in that folder's README before use, so a
truncated or edited copy is caught with a message that says where the files come from.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from protocols.errors import DataError

ENV_VAR = "VFL_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
SOURCE = (
    "copies of the FATE project's example data (github.com/FederatedAI/FATE, examples/data, "
    "commit ea550db8; UCI Breast Cancer Wisconsin and UCI 'default of credit card clients')"
)
_SHA_LINE = re.compile(r"^([0-9a-f]{64})\s+(\S+)\s*$")


@dataclass(frozen=True)
class DataSet:
    """A verified data file."""

    name: str
    path: Path
    sha256: str
    size: int


def data_dir(environ: Mapping[str, str]) -> Path:
    """The data folder: ``$VFL_DATA_DIR`` or the default beside the repository."""
    value = environ.get(ENV_VAR)
    return Path(value).expanduser().resolve() if value else DEFAULT_DATA_DIR


def expected_hashes(folder: Path) -> dict[str, str]:
    """File name -> sha256 from the README of ``folder``."""
    readme = folder / "README.md"
    if not readme.is_file():
        raise DataError(
            f"no data sets at {folder} (expected {readme} with their sha256 list). Set {ENV_VAR} "
            f"to the folder holding them; they are {SOURCE}"
        )
    hashes = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        match = _SHA_LINE.match(line.strip())
        if match:
            hashes[match.group(2)] = match.group(1)
    if not hashes:
        raise DataError(f"{readme} lists no sha256 sums; is {folder} the right data folder?")
    return hashes


def verify(name: str, *, folder: Path) -> DataSet:
    """Check ``folder/name`` against its listed sha256 and return it."""
    hashes = expected_hashes(folder)
    if name not in hashes:
        raise DataError(
            f"{name!r} is not one of the data sets listed in {folder / 'README.md'} "
            f"({', '.join(sorted(hashes))})"
        )
    path = folder / name
    if not path.is_file():
        raise DataError(
            f"data set {name} not found at {path}; set {ENV_VAR} to the folder holding it "
            f"({SOURCE})"
        )
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != hashes[name]:
        raise DataError(
            f"{path} has sha256 {actual[:16]}..., expected {hashes[name][:16]}... from "
            f"{folder / 'README.md'}: the file is modified or truncated; restore it ({SOURCE})"
        )
    return DataSet(name=name, path=path, sha256=actual, size=path.stat().st_size)


def verify_all(*, folder: Path) -> list[DataSet]:
    """Verify every file listed in the folder's README."""
    return [verify(name, folder=folder) for name in sorted(expected_hashes(folder))]
