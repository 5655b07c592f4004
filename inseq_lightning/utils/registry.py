"""A tiny generic registry: things registered by name, listable and looked up with a clear error."""

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps identifiers to objects (classes or functions) of one kind.

    Example:
        >>> methods = Registry[type]("attribution method", error=None)
        >>> @methods.register("saliency")
        ... class Saliency: ...
        >>> methods.names()
        ['saliency']
    """

    def __init__(self, kind: str, error: Callable[[str, list[str]], Exception] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._error = error

    def register(self, name: str, item: T | None = None, overwrite: bool = False):
        """Register ``item`` under ``name``; usable as a decorator when ``item`` is omitted."""

        def _add(obj: T) -> T:
            if name in self._items and not overwrite:
                raise ValueError(f"A {self.kind} named {name!r} is already registered; pass overwrite=True.")
            self._items[name] = obj
            return obj

        return _add(item) if item is not None else _add

    def get(self, name: str) -> T:
        if name not in self._items:
            if self._error is not None:
                raise self._error(name, self.names())
            raise KeyError(f"Unknown {self.kind} {name!r}. Choose one of: {', '.join(self.names())}.")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
