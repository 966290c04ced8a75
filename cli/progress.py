"""Drawing the agent's progress (editors.progress.Progress): a bar on a terminal, plain lines
otherwise.

`make_progress()` returns a callable `(phase, done, total)`. When stderr is a terminal it draws a
tqdm bar per phase; otherwise (a pipe, a log file, CliRunner) it writes plain lines such as
`apply: values 3/10`, at most one per phase every `interval_s` seconds, plus the first and the
last, so a log gets a few lines rather than bar frames.
"""
from __future__ import annotations

import logging

import sys
import time
from collections.abc import Callable

import click

DEFAULT_INTERVAL_S = 2.0


class LineProgress:
    """Plain, throttled progress lines on stderr."""

    def __init__(self, prefix: str | None = None, *, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, echo=None):
        self.prefix, self.interval_s, self.clock = prefix, interval_s, clock
        self.echo = echo or (lambda line: click.echo(line, err=True))
        self._last: dict[str, float] = {}

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        now = self.clock()
        final = total is not None and done >= total
        first = phase not in self._last
        if not (first or final or now - self._last[phase] >= self.interval_s):
            return
        self._last[phase] = now
        where = f"{self.prefix}: " if self.prefix else ""
        self.echo(f"{where}{phase} {done}/{total}" if total is not None else f"{where}{phase} {done}")
        if final:
            del self._last[phase]


class BarProgress:
    """One tqdm bar per phase on stderr (a terminal)."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix
        self._bars: dict[str, object] = {}

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(phase)
        if bar is None:
            desc = f"{self.prefix}: {phase}" if self.prefix else phase
            bar = self._bars[phase] = tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                                           dynamic_ncols=True, disable=False)  # TQDM_DISABLE is for others' bars
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        if total is not None and done >= total:
            bar.close()
            del self._bars[phase]


def make_progress(prefix: str | None = None, *, tty: bool | None = None):
    """A Progress for the current command: a bar on a terminal, lines otherwise."""
    if prefix is None:
        ctx = click.get_current_context(silent=True)
        prefix = ctx.info_name if ctx is not None and ctx.parent is not None else None
    if tty is None:
        tty = sys.stderr.isatty()
    return BarProgress(prefix) if tty else LineProgress(prefix)


class _StderrLines(logging.Handler):
    """One plain line per record on the current sys.stderr (looked up at each record, so that a
    test runner's swapped stream is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - logging must never break a command
            self.handleError(record)


def show_phase_lines(enabled: bool = True, names: tuple[str, ...] = ("knowledger.editors.stats",
                                                                     "knowledger.editors.corpus")) -> None:
    """Let the one-time phases' INFO lines ("statistics: sampling 15,360 tokens ... done in 41 s")
    reach stderr whether or not it is a terminal (enabled=False, for --quiet: they don't).
    Idempotent; the CLI group calls it once per command."""
    for name in names:
        logger = logging.getLogger(name)
        handler = next((h for h in logger.handlers if isinstance(h, _StderrLines)), None)
        if handler is None:
            handler = _StderrLines()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        handler.setLevel(logging.INFO if enabled else logging.CRITICAL + 1)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
