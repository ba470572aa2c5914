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

    def get(self, name: str) -> T:
        if name not in self._items:
            raise did_you_mean(name, list(self._items), self.what)
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
