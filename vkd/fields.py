"""Documented config fields (TRL style): each declared with its help, the choices or bounds
it must meet, checked whenever its section is made, from YAML or in code; errors name the
field."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


_SAID: set[str] = set()


def deprecated(message: str) -> None:
    """One line on stderr, once per process: a config key of an earlier version, still
    applied; the message names its new spelling."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"warning: {message}", file=sys.stderr)


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, choices: tuple = (),
           low: float | None = None, above: float | None = None, high: float | None = None) -> Any:
    """A documented config field: ``help``, the allowed ``choices``, and bounds (``low`` and
    ``high`` inclusive, ``above`` exclusive), checked by :func:`check_fields`."""
    meta = {"help": help, "choices": tuple(choices), "low": low, "above": above, "high": high}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_fields(obj: Any, section: str) -> None:
    """Every field of a config dataclass within its declared choices and bounds, and every
    number finite; the error names ``section.field``."""
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        where = f"{section}.{f.name}" if section else f.name
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}={value!r}: expected a finite number")
        if isinstance(value, (list, tuple)) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(f"{where}={value!r}: expected finite numbers")
        if not meta:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{where}={value!r}; choose one of {', '.join(map(str, meta['choices']))}")
        if meta.get("low") is not None and value < meta["low"]:
            raise ConfigError(f"{where}={value!r}: must be at least {meta['low']:g}")
        if meta.get("above") is not None and value <= meta["above"]:
            raise ConfigError(f"{where}={value!r}: must be greater than {meta['above']:g}")
        if meta.get("high") is not None and value > meta["high"]:
            raise ConfigError(f"{where}={value!r}: must be at most {meta['high']:g}")


@dataclass
class Section:
    """A config section: its fields are checked when it is made; ``check`` adds the checks
    across fields."""
    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, self.section)
        self.check()

    def check(self) -> None:
        """Checks across fields (raise ConfigError naming the field)."""

    def fail(self, name: str, what: str) -> ConfigError:
        return ConfigError(f"{self.section}.{name}={getattr(self, name)!r}: {what}")
