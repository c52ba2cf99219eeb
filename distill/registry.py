"""The one registry of names that recipes may use (losses, model architectures)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from distill.errors import RecipeError

__all__ = ["Registry", "suggest"]

T = TypeVar("T")


def suggest(name: str, known: list[str]) -> str:
    """Return ``" did you mean 'x'?"`` for the closest known name, or an empty string."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """Maps names to factories; refuses duplicates and explains bad lookups.

    Args:
        kind: What the names stand for, used in messages ("loss", "architecture").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name``; a second registration of a name is an error."""
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda item: self.add(name, item)

    def get(self, name: str) -> T:
        """Look a name up, or raise a :class:`RecipeError` that lists the known names."""
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            raise RecipeError(
                f"unknown {self.kind} '{name}';{suggest(name, known)} known: {', '.join(known)}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
