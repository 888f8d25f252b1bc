"""Identifiers that travel between parties, and the paths a party builds from them.

Every job, run, model and grant id that a peer can choose is checked by
:func:`check_identifier` when an envelope is decoded, and every id inside a control block
where a protocol reads it (docs/protocol.md §2.9), so no protocol ever sees an id that
could act as a path: no ``.`` or ``..``, no separator,
no absolute path, no control character, at most :data:`MAX_ID_LENGTH` characters.
:func:`state_path` is the only way to turn ids into a path under a party's state
folder; it checks each part again and that the resolved result stays under the root
(a symbolic link planted inside the state folder cannot lead out of it).
"""

from __future__ import annotations

import re
from pathlib import Path

from protocols.errors import MalformedEnvelopeError, ProtocolError, VflError

MAX_ID_LENGTH = 128
"""The longest id on the wire; ids chosen in a config or job file are shorter (see
:data:`MAX_USER_ID_LENGTH`) so that derived ids (``<job>.psi``, ``<model>.scoring``)
still fit."""

MAX_USER_ID_LENGTH = 96
"""The longest id a person may choose for a job or a model."""

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class UnsafePathError(ProtocolError):
    """A path built from identifiers would leave the party's state folder."""


def is_identifier(value: object, *, max_length: int = MAX_ID_LENGTH) -> bool:
    """Whether ``value`` is a safe identifier (see the module docstring)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= max_length
        and _IDENTIFIER.fullmatch(value) is not None
    )


def check_identifier(
    value: object,
    *,
    what: str,
    max_length: int = MAX_ID_LENGTH,
    error: type[VflError] = MalformedEnvelopeError,
) -> str:
    """Return ``value`` if it is a safe identifier, else raise ``error``.

    Parameters
    ----------
    value
        The candidate id.
    what
        What the id names, for the message (``"job id"``, ``"model id"``).
    max_length
        Its longest allowed length.
    error
        The error class: :class:`MalformedEnvelopeError` for ids a peer sent,
        :class:`~protocols.errors.ConfigError` for ids in a local file.

    The message never echoes the value itself in full (it may be hostile); it shows a
    short, printable prefix.
    """
    if is_identifier(value, max_length=max_length):
        return str(value)
    shown = repr(value)[:40] if isinstance(value, str) else type(value).__name__
    message = (
        f"{what} {shown} is not a valid identifier: use 1-{max_length} letters, digits, "
        "'.', '_' or '-', starting with a letter or digit"
    )
    raise error(message, public=message)  # about the sender's own value: safe to tell it


def state_path(root: Path, *parts: str) -> Path:
    """``root / parts[0] / ...`` after checking that each part is an identifier and that
    the resolved path stays under ``root``; raise :class:`UnsafePathError` otherwise.

    File names of the engine's own (``result.json``) pass the same check.
    """
    path = root
    for part in parts:
        if not is_identifier(part, max_length=255):
            raise UnsafePathError(
                f"refused to build a path from {repr(part)[:40]}: not a valid identifier"
            )
        path = path / part
    base = root.resolve()
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafePathError("a path built from ids would leave the party's state folder")
    return path
