"""Method names → method classes: one registry for every system users pick by name.

``alignkit methods`` and :func:`available` list it; :func:`alignkit.register` (``method=NAME``),
``alignkit train --method NAME`` and ``alignkit evaluate --method NAME`` look names up here. A
method module registers its class at import with :func:`register_method`; the built-in modules are
imported by :mod:`alignkit.methods`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from alignkit.errors import ConfigError

if TYPE_CHECKING:
    from alignkit.methods.base import Method, MethodInfo

_METHODS: dict[str, type[Method]] = {}

M = TypeVar("M", bound="type[Method]")


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available under ``cls.info.name``."""
    name = cls.info.name
    if not name or name != name.strip() or ":" in name:
        raise ConfigError(f"bad method name {name!r} (non-empty, no spaces at the ends, no colon)")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ConfigError(f"method name {name!r} is already registered to {_METHODS[name].__name__}")
    _METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    """Every registered name, ``classical`` first, then sorted."""
    return sorted(_METHODS, key=lambda n: (n != "classical", n))


def get_method(name: str) -> type[Method]:
    """The class registered as ``name``; a one-line :class:`ConfigError` naming the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(method_names())}") from None


def available() -> list[MethodInfo]:
    """The :class:`~alignkit.methods.base.MethodInfo` of every registered method."""
    return [_METHODS[name].info for name in method_names()]
