"""Progress of a long stage with an ETA, where the user is looking.

On a terminal: a live tqdm bar.  Anywhere else (a Snakemake job's log, the
Snakemake console through that log, a SLURM output file) carriage-return bars
would fill the file, so :class:`ProgressLines` logs one plain line at most
every :data:`INTERVAL_S` seconds (time-based, not every N steps: a slow step
and a fast one both give a line about every 30 s)::

    2026-12-06 07:01:02,345 INFO unet_pipe.progress: train: 1200/6000 steps (20%), 3m12s elapsed, ETA 12m48s, loss=0.3412

``UNET_PIPE_PROGRESS_SECONDS`` changes the interval (tests set it to 0).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

INTERVAL_S = 30.0
ENV_INTERVAL = "UNET_PIPE_PROGRESS_SECONDS"

log = logging.getLogger("unet_pipe.progress")


def format_seconds(seconds: float) -> str:
    """``1h02m03s``, ``4m05s`` or ``7s`` (rounded to whole seconds)."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _interval() -> float:
    value = os.environ.get(ENV_INTERVAL)
    try:
        return INTERVAL_S if value is None else max(0.0, float(value))
    except ValueError:
        return INTERVAL_S


class ProgressLines:
    """A tqdm look-alike (``update``, ``set_postfix``, iteration, ``close``) that logs plain lines.

    A line is logged on an update at least ``interval`` seconds after the
    previous line (or the start), and once at the end of a stage that logged
    any.  The ETA is the remaining count at the mean rate since the start.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        **_: Any,  # tqdm options that mean nothing in a line (dynamic_ncols, smoothing, unit_scale)
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self._first = initial
        self.interval = _interval() if interval is None else interval
        self._clock = clock
        self._start = self._last = clock()
        self._postfix = ""
        self._logged_n = initial
        self.lines = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()  # as tqdm does: a loop's last line without a close() by the caller

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last, self._logged_n = now, self.n
            self.lines += 1
            log.info("%s", self.line(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def line(self, now: float) -> str:
        """``desc: n/total units (p%), elapsed, ETA, postfix`` as of ``now``."""
        elapsed = now - self._start
        done = self.n - self._first
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%)"
                 if self.total else f"{self.desc}: {self.n} {self.unit}s",
                 f"{format_seconds(elapsed)} elapsed"]
        if self.total:
            if self.n >= self.total:
                parts.append("done")
            elif done > 0 and elapsed > 0:
                parts.append(f"ETA {format_seconds((self.total - self.n) * elapsed / done)}")
            else:
                parts.append("ETA unknown")
        if self._postfix:
            parts.append(self._postfix)
        return ", ".join(parts)

    def close(self) -> None:
        """Log the final count, if the stage was long enough to log a line before."""
        if self.lines and self.n != self._logged_n:
            self._logged_n = self.n
            log.info("%s", self.line(self._clock()))


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal, :class:`ProgressLines` elsewhere; disabled: a silent tqdm.

    ``kwargs`` are tqdm's (``total``, ``desc``, ``unit``, ``initial``, ...).
    """
    from tqdm import tqdm

    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return ProgressLines(iterable, **kwargs)


__all__ = ["INTERVAL_S", "ProgressLines", "format_seconds", "progress_bar"]
