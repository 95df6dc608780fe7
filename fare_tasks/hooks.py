"""Pluggable callables (refusal judges, toxicity scorers) chosen by name.

A *spec* is either a name registered in a :class:`HookRegistry` or ``"package.module:function"``
naming an importable callable (never a file path; nothing is downloaded or unpickled here). The
active spec of a hook is, in order: the task metadata key (``--metadata '{"refusal_judge": ...}'``,
recorded by the task's dataset loader for the current run), the environment variable, the default.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

from fare_core.errors import FareError


class HookError(FareError):
    """A hook spec names nothing usable."""


class HookRegistry:
    """Named callables of one kind, plus resolution of ``module:function`` specs."""

    def __init__(self, kind: str, env_var: str, metadata_key: str, default: str):
        self.kind, self.env_var, self.metadata_key, self.default = kind, env_var, metadata_key, default
        self._named: dict[str, Callable] = {}
        self._resolved: dict[str, Callable] = {}
        self._run_spec: str | None = None  # set from task metadata by the dataset loader

    def register(self, name: str, fn: Callable | None = None):
        """Register ``fn`` under ``name`` (usable as a decorator)."""
        if ":" in name:
            raise HookError(f"{self.kind} name {name!r} must not contain ':' (reserved for module:function specs)")

        def _add(f: Callable) -> Callable:
            self._named[name] = f
            self._resolved.pop(name, None)
            return f

        return _add(fn) if fn is not None else _add

    def names(self) -> list[str]:
        return sorted(self._named)

    def configure_from_metadata(self, metadata: dict | None) -> None:
        """Record the run's spec from task metadata (``None`` clears an earlier run's choice)."""
        spec = (metadata or {}).get(self.metadata_key)
        if spec is not None:
            self.resolve(str(spec))  # fail fast, at task build time
        self._run_spec = None if spec is None else str(spec)

    def active_spec(self) -> str:
        return self._run_spec or os.environ.get(self.env_var) or self.default

    def active(self) -> tuple[str, Callable]:
        spec = self.active_spec()
        return spec, self.resolve(spec)

    def resolve(self, spec: str) -> Callable:
        if spec in self._resolved:
            return self._resolved[spec]
        allowed = f"allowed: {', '.join(self.names())} or 'package.module:function'"
        if spec in self._named:
            fn = self._named[spec]
        elif ":" in spec:
            module_name, _, attr = spec.partition(":")
            if not module_name or not attr or "/" in module_name:
                raise HookError(f"bad {self.kind} spec {spec!r}; {allowed}")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise HookError(f"{self.kind} {spec!r}: cannot import {module_name!r} ({exc}); {allowed}") from exc
            fn = getattr(module, attr, None)
            if not callable(fn):
                raise HookError(f"{self.kind} {spec!r}: {module_name!r} has no callable {attr!r}; {allowed}")
        else:
            raise HookError(f"unknown {self.kind} {spec!r}; {allowed}")
        self._resolved[spec] = fn
        return fn
