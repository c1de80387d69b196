"""A small name → factory table used by every extension point (tasks, scores, ablations, selectors)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from dynheads.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Spec:
    """A registered thing by name plus its keyword arguments; stored in run configs."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[F]):
    """Maps names to factories; `get` fails with a ConfigError listing the valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def create(self, spec: Spec) -> Any:
        fn = self.get(spec.name)
        params = inspect.signature(fn).parameters
        accepts_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in spec.args if k not in params and not accepts_kw]
        if unknown:
            raise ConfigError(f"{self.kind} '{spec.name}' has no argument '{unknown[0]}'")
        return fn(**spec.args)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
