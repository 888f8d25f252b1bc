"""Checked values of a parsed TOML table: the readers every section of the party config uses.

Each reader takes the table, the key and ``where`` (file and key, for the message) and raises
:class:`~protocols.errors.ConfigError` naming them when the value is missing or malformed.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from protocols.errors import ConfigError

_E = TypeVar("_E", bound=StrEnum)


def only_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """Refuse any key of ``table`` outside ``allowed``."""
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r}; expected one of {', '.join(sorted(allowed))}"
            )


def section(raw: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    """The required section ``[name]`` of ``raw``."""
    value = raw.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: missing section [{name}]")
    return value


def required_str(table: Mapping[str, Any], key: str, where: str) -> str:
    """The required non-empty string ``table[key]``, stripped."""
    if key not in table:
        raise ConfigError(f"{where}: missing (required)")
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a non-empty string, got {value!r}")
    return value.strip()


def str_list(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    """The list of non-empty strings ``table[key]`` (None when absent)."""
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


def enum_list(
    table: Mapping[str, Any], key: str, where: str, kind: type[_E]
) -> tuple[_E, ...] | None:
    """The list ``table[key]`` as members of ``kind`` (None when absent)."""
    names = str_list(table, key, where)
    if names is None:
        return None
    out = []
    for name in names:
        try:
            out.append(kind(name))
        except ValueError:
            raise ConfigError(
                f"{where}: {name!r} is not one of {', '.join(m.value for m in kind)}"
            ) from None
    return tuple(out)


def positive_int(table: Mapping[str, Any], key: str, where: str) -> int | None:
    """The positive integer ``table[key]`` (None when absent)."""
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def host_port(value: str, where: str) -> str:
    """``value`` checked as ``host:port``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {value!r} is not host:port (e.g. '127.0.0.1:50051')")
    return value


def resolve_path(base: Path, value: str) -> Path:
    """``value`` as a path, relative ones resolved against ``base``."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()
