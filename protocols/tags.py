"""Message tags.

Upper layers define their tags as ``Enum`` members whose values are namespaced
strings (``"splitnn.Z_FWD"``) and register the enum classes at start-up; this
layer knows no upper-layer enum. A receiver refuses any tag nobody registered.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from enum import Enum

from protocols.errors import ConfigError, UnknownTagError

_TAG = re.compile(r"^[a-z][a-z0-9_]*\.[A-Z][A-Z0-9_]*$")


def tag_value(tag: Enum | str) -> str:
    """The wire string of a tag given as an enum member or a string."""
    value = tag.value if isinstance(tag, Enum) else tag
    if not isinstance(value, str):
        raise ConfigError(f"tag {tag!r} must have a string value such as 'splitnn.Z_FWD'")
    return value


class TagRegistry:
    """The set of tags a party accepts. Thread-safe; one per channel, no global state."""

    def __init__(self, enums: Iterable[type[Enum]] = ()) -> None:
        self._lock = threading.Lock()
        self._tags: set[str] = set()
        for enum_cls in enums:
            self.register(enum_cls)

    def register(self, enum_cls: type[Enum]) -> None:
        """Register every member of ``enum_cls`` (values like ``"protocol.NAME"``)."""
        values = [tag_value(member) for member in enum_cls]
        for value in values:
            if not _TAG.match(value):
                raise ConfigError(
                    f"{enum_cls.__name__}: tag {value!r} must look like 'protocol.NAME' "
                    "(lower-case namespace, a dot, upper-case name)"
                )
        with self._lock:
            self._tags.update(values)

    def __contains__(self, tag: object) -> bool:
        with self._lock:
            return tag in self._tags

    def check(self, tag: str) -> None:
        """Raise :class:`UnknownTagError` unless ``tag`` is registered."""
        if tag not in self:
            raise UnknownTagError(
                f"unknown message tag {tag[:80]!r}: no protocol on this party registered it "
                "(are both parties running the same engine version?)"
            )
