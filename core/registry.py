"""Name -> object registries for what users pick by name (algorithms, scorers, engines)."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict plus a decorator that rejects duplicates; a miss lists the valid names.

    With `importable=True`, a name "package.module:attr" is imported instead of looked up, so
    users can select their own objects from YAML without registering them.
    """

    def __init__(self, kind: str, *, importable: bool = False) -> None:
        self.kind = kind
        self.importable = importable
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return wrap

    def get(self, name: str) -> T:
        if self.importable and ":" in name:
            return self.import_object(name, kind=self.kind)
        if name not in self._items:
            hint = " (or a 'package.module:name' import path)" if self.importable else ""
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}{hint}")
        return self._items[name]

    @staticmethod
    def import_object(path: str, *, kind: str) -> Any:
        """The object at "package.module:attr"; ValueError naming what failed."""
        module, _, attr = path.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{kind} {path!r}: cannot import {attr!r} from {module!r}: {e}") from e

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
