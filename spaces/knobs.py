"""Searchable knobs: a fixed value, a choice, or an int/float range.

A knob is declared in a space file as a plain value (fixed), ``{choice: [...]}``, or
``{low: a, high: b, log: bool, step: n}``. Sampling goes through a *suggester*: any
object with Optuna's ``suggest_categorical / suggest_int / suggest_float`` methods, so an
``optuna.Trial`` drives the search while :class:`RandomSuggester` serves one-off trials,
without this package importing Optuna.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol, Union

Scalar = Union[bool, int, float, str, None]


class Suggester(Protocol):
    """The part of ``optuna.Trial`` that sampling needs."""

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...


@dataclass(frozen=True)
class Fixed:
    value: Any

    def sample(self, name: str, suggester: Suggester) -> Any:
        return self.value

    def contains(self, value: Any) -> bool:
        return value == self.value

    def describe(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Choice:
    values: tuple[Scalar, ...]

    def sample(self, name: str, suggester: Suggester) -> Any:
        return suggester.suggest_categorical(name, list(self.values))

    def contains(self, value: Any) -> bool:
        return value in self.values

    def describe(self) -> Any:
        return {"choice": list(self.values)}


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False
    step: int = 1

    def sample(self, name: str, suggester: Suggester) -> int:
        return suggester.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> Any:
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def sample(self, name: str, suggester: Suggester) -> float:
        return suggester.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> Any:
        return {"low": self.low, "high": self.high, "log": self.log}


Knob = Union[Fixed, Choice, IntRange, FloatRange]


class RandomSuggester:
    """Uniform (or log-uniform) sampling with a seeded RNG, for trials outside a search."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._rng.choice(choices)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        if log:
            import math

            value = int(round(math.exp(self._rng.uniform(math.log(low), math.log(high)))))
            return min(high, max(low, low + (value - low) // step * step))
        return self._rng.randrange(low, high + 1, step)

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        if log:
            import math

            return math.exp(self._rng.uniform(math.log(low), math.log(high)))
        return self._rng.uniform(low, high)


class PinnedSuggester:
    """Takes the values a user pinned (``--params``) and samples the rest with ``fallback``."""

    def __init__(self, pinned: dict[str, Any], fallback: Suggester) -> None:
        self.pinned = dict(pinned)
        self.used: set[str] = set()
        self._fallback = fallback

    def _take(self, name: str, sample):
        if name in self.pinned:
            self.used.add(name)
            return self.pinned[name]
        return sample()

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._take(name, lambda: self._fallback.suggest_categorical(name, choices))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._take(name, lambda: self._fallback.suggest_int(name, low, high, step=step, log=log))

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return self._take(name, lambda: self._fallback.suggest_float(name, low, high, step=step, log=log))
