"""One registration call per component, checked; lookups answer with "did you mean"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from layerfold.errors import did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} '{name}' registered twice")
            self._items[name] = item
            return item

        return decorator

    def canonical(self, name: str) -> str:
        """The registered name ``name`` stands for, matched without regard to case or to
        ``_`` for ``-`` (``SLM`` -> ``slm``); an unknown name raises with "did you mean"."""
        if name in self._items:
            return name
        wanted = _fold(name)
        for key in self._items:
            if _fold(key) == wanted:
                return key
        raise did_you_mean(name, list(self._items), self.what)

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def _fold(name: str) -> str:
    return name.casefold().replace("_", "-")
