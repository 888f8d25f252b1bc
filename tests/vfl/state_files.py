"""What a party keeps in its state folder is owner-only (docs/protocol.md §2.9)."""

from __future__ import annotations

import stat
from pathlib import Path


def not_private(state_dir: Path) -> list[str]:
    """Every file under ``state_dir`` (itself included) that is not 0600 and every folder
    that is not 0700, with its mode; links are not followed (none should be there)."""
    wrong = []
    for path in [state_dir, *state_dir.rglob("*")]:
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            ok = mode == 0o700
        else:
            ok = stat.S_ISREG(info.st_mode) and mode == 0o600
        if not ok:
            wrong.append(f"{path.relative_to(state_dir)} {mode:o}")
    return wrong
