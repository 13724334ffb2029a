"""Settings read from ``NVILA_QUANT_*`` environment variables, one dataclass per device or stage.

Each field names its variable and its allowed values (:func:`knob`). A settings object is built from the
environment when first used (:class:`Lazy`), every value parsed and validated then, and a bad one raises a
:class:`~nvila_quant.errors.ConfigError` naming the variable and what it accepts. Code changes a field by
assignment (validated the same way) or for a block with :func:`overrides`; a subclass's :meth:`Settings.changed`
hook tells the objects that cached decisions taken under the old value.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from nvila_quant.errors import ConfigError

__all__ = ["Knob", "Lazy", "Settings", "knob", "overrides"]

T = TypeVar("T", bound="Settings")
_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Knob:
    """How one field is read: its variable, the kind of value and what is allowed."""

    var: str
    kind: type  # int, float, bool or str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    optional: bool = False  # None (the measured default) is allowed

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "0 or 1"
        what = "an integer" if self.kind is int else "a number" if self.kind is float else "a string"
        return what + (f" >= {self.minimum:g}" if self.minimum is not None else "")

    def parse(self, raw: str) -> Any:
        """The value of the variable's text ``raw``; ConfigError naming the variable when it does not parse."""
        try:
            if self.kind is bool:
                if raw.strip().lower() not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
                    raise ValueError(raw)
                return raw.strip().lower() in ("1", "true", "yes", "on")
            if self.kind is int:
                number = float(raw)
                if not number.is_integer():
                    raise ValueError(raw)
                return int(number)
            if self.kind is float:
                return float(raw)
            return raw.strip()
        except ValueError:
            raise ConfigError(f"{self.var} must be {self.allowed()}, got {raw!r}") from None

    def check(self, value: Any, raw: str | None = None) -> Any:
        """``value`` if allowed, else ConfigError naming the variable, the allowed values and what was given (``raw``,
        the variable's text, when it came from the environment)."""
        if value is None and self.optional:
            return None
        ok = isinstance(value, self.kind) or (self.kind is float and isinstance(value, int))
        ok = ok and not (self.kind is int and isinstance(value, bool))
        if ok and self.choices is not None:
            ok = value in self.choices
        if ok and self.minimum is not None:
            ok = value >= self.minimum
        if not ok:
            shown = raw if raw is not None else repr(value)
            raise ConfigError(f"{self.var} must be {self.allowed()}, got {shown}")
        return value


def knob(var: str, default: Any, kind: type, *, choices: tuple[Any, ...] | None = None,
         minimum: float | None = None, optional: bool = False) -> Any:
    """A dataclass field read from ``var`` (``default`` when unset or empty)."""
    meta = Knob(var, kind, choices, minimum, optional)
    return dataclasses.field(default=default, metadata={"knob": meta})


class Settings:
    """Base of the settings dataclasses: fields declared with :func:`knob`; assignments are validated."""

    @classmethod
    def knobs(cls) -> dict[str, Knob]:
        return {f.name: f.metadata["knob"] for f in dataclasses.fields(cls) if "knob" in f.metadata}  # type: ignore[arg-type]

    @classmethod
    def from_env(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
        """Parse and validate every variable (unset or empty: the field's default)."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, k in cls.knobs().items():
            raw = environ.get(k.var)
            if raw is not None and raw.strip():
                values[name] = k.check(k.parse(raw), repr(raw))
        return cls(**values)

    def __setattr__(self, name: str, value: Any) -> None:
        k = type(self).knobs().get(name)
        if k is not None:
            value = k.check(value)
        initialised = name in self.__dict__
        object.__setattr__(self, name, value)
        if initialised:
            self.changed(name)

    def changed(self, name: str) -> None:
        """Called after field ``name`` changed on a live object (subclasses drop cached decisions here)."""


class Lazy(Generic[T]):
    """The settings object of one kind, built from the environment on first use: ``CPU = Lazy(CpuSettings)``;
    ``CPU()`` returns it. :meth:`reload` re-reads the environment (tests)."""

    def __init__(self, cls: type[T], on_create: Callable[[T], None] | None = None) -> None:
        self.cls, self.on_create = cls, on_create
        self._value: T | None = None

    def __call__(self) -> T:
        if self._value is None:
            value = self.cls.from_env()
            self._value = value
            if self.on_create is not None:
                self.on_create(value)
        return self._value

    def reload(self) -> T:
        """Forget the current object and build a new one from the environment now."""
        self._value = None
        value = self()
        for name in value.knobs():
            value.changed(name)
        return value


@contextmanager
def overrides(settings: Settings, **changes: Any) -> Iterator[Settings]:
    """Change fields of ``settings`` for the block, e.g. ``with overrides(cpu_settings(), dense_min_tokens=1)``."""
    known = type(settings).knobs()
    if unknown := sorted(set(changes) - set(known)):
        raise TypeError(f"unknown {type(settings).__name__} fields {unknown}; known: {sorted(known)}")
    old = {k: getattr(settings, k, _UNSET) for k in changes}
    try:
        for k, v in changes.items():
            setattr(settings, k, v)
        yield settings
    finally:
        for k, v in old.items():
            setattr(settings, k, v)
