"""Typed exceptions. The CLI turns every ``AlignkitError`` into one line on stderr and exit code 2."""

from __future__ import annotations


class AlignkitError(Exception):
    """Base class of every error alignkit raises on purpose."""


class InputError(AlignkitError, ValueError):
    """A file or array given by the user cannot be used; the message names it and says why."""

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ShapeError(AlignkitError, ValueError):
    """A tensor or grid does not have the shape a function documents."""


class ConfigError(AlignkitError, ValueError):
    """An unknown option, preset or inconsistent configuration."""


class NotInvertibleError(AlignkitError, NotImplementedError):
    """The transform model has no closed-form or cheap inverse."""
