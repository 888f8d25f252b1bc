"""Writing files so that a crash never leaves a partial one, and owner-only by default."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

from protocols.errors import NoSpaceError

logger = logging.getLogger(__name__)

PRIVATE_FILE = 0o600
"""Mode of every file a party keeps (results, scores, reports, models, checkpoints)."""
PRIVATE_DIR = 0o700
"""Mode of every folder a party creates to hold them."""


def atomic_write(path: Path, data: bytes, *, mode: int = PRIVATE_FILE) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see the old content or the new, never a mix. ``mode`` is set regardless of the
    umask: owner-only unless the caller asks for more (``0o644`` for certificates and other
    public files).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_dir(path: Path) -> Path:
    """Create ``path`` and every missing parent as owner-only (0700) folders; return ``path``.

    Unlike ``Path.mkdir(parents=True, mode=...)``, which gives the parents it creates the
    default mode, every folder made here is 0700 regardless of the umask. Folders that exist
    already keep their mode.
    """
    missing: list[Path] = []
    folder = path
    while not os.path.lexists(folder) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        try:
            made.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue  # made meanwhile by another thread
        os.chmod(made, PRIVATE_DIR)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    return path


NO_SPACE = "no space left"
"""The phrase every report of a full state folder starts with (for people: the signal
between parties is the ``no_space`` flag, never this text)."""


def is_no_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a full disk: ``ENOSPC``/``EDQUOT``
    or a :class:`NoSpaceError` (raised for a peer's report only when the peer flagged it,
    ``no_space``: no text a peer chooses passes for one)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NoSpaceError):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space_error(folder: Path, exc: BaseException, *, what: str) -> NoSpaceError:
    """The error that names the full ``folder`` (``what``: whose folder it is)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return NoSpaceError(
        f"{NO_SPACE} in {folder} ({what}): {reason}; free space there, the job goes on by "
        "itself once it can write again"
    )


def cut_torn_tail(path: Path) -> None:
    """Cut a last line left incomplete (a crash, a failed write), so that the next append
    starts on a line of its own; reads only the file's tail. For append-only journals (the
    replay journal, the arbiter's policy journal)."""
    try:
        handle = path.open("r+b")
    except FileNotFoundError:
        return
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        end = size
        while end > 0:  # find the last newline, a block at a time from the end
            start = max(0, end - 65536)
            handle.seek(start)
            block = handle.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        logger.warning("journal %s ends in a torn line; dropped %d B", path, size - keep)
        handle.truncate(keep)
