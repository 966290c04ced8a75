"""Progress reporting as a callback: the library reports, the CLI draws.

Every long-running function in editors/ and agent/ takes `progress: Progress | None` and calls it
as `progress(phase, done, total)`: `phase` a short stable name ("stats", "sample", "values",
"keys", "apply", "audit", ...), `done` units finished so far, `total` the units expected (None
when unknown). Nothing under editors/ or agent/ draws a bar or prints: the CLI passes a callable
that draws a bar on a terminal and writes plain, throttled lines otherwise (cli/progress.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Progress = Callable[[str, int, "int | None"], None]
T = TypeVar("T")


def silent(phase: str, done: int, total: int | None) -> None:
    """A Progress that reports nowhere."""


def report(progress: Progress | None, phase: str, done: int, total: int | None) -> None:
    """progress(phase, done, total) if a callback was given."""
    if progress is not None:
        progress(phase, done, total)


def track(items: Iterable[T], progress: Progress | None, phase: str, total: int | None = None,
          *, weight: Callable[[T], int] | None = None) -> Iterator[T]:
    """Yield `items`, reporting (phase, done, total) before the first and after each one.

    weight: units per item (e.g. tokens per batch); default 1.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    done = 0
    report(progress, phase, 0, total)
    for item in items:
        yield item
        done += weight(item) if weight else 1
        report(progress, phase, done, total)
