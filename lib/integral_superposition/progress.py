"""Progress of long steps: one :class:`Reporter` that tells a slow step from a hung one.

Every long library function takes ``on_progress(done, total)`` (a :data:`ProgressFn`; a
callback that also accepts ``phase=`` gets the name of the current phase) and wraps it in a
:class:`Reporter`, which adds the rate, the ETA and the phase, and shows them:

- on a terminal (``show=True`` and stderr is a TTY): a tqdm bar;
- off a terminal (``show=True``, stderr redirected): a plain line every ``line_every_s``;
- to a ``logger`` (the Prefect run logger in the tasks): the same plain lines;
- and, while the reporter is open (``with Reporter(...)``), a heartbeat line whenever
  ``interval_s`` pass without one, saying how long ago the last update came.

A line reads ``merge 4/13 steps (31%) | 0.02 steps/s | ETA 7m30s | sweep K'=256 random``.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["ProgressFn", "Reporter", "format_duration", "report_phase"]

ProgressFn = Callable[[int, int], None]
"""``on_progress(done, total)`` after each unit of work. A callback that also accepts a
``phase`` keyword gets the current phase (``"scan"``, ``"sweep K'=512 cluster"``, ...) and
is called when the phase changes too."""

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``; ``4000`` -> ``"1h06m"``; NaN or infinite -> ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def report_phase(on_progress: ProgressFn | None, done: int, total: int, phase: str) -> None:
    """Tell ``on_progress`` that the work entered ``phase`` at ``done`` of ``total`` units (for
    the stages after the counted units, e.g. a training run's decoder refit and publication);
    a callback without a ``phase`` keyword is not called."""
    if _accepts_phase(on_progress):
        on_progress(done, total, phase=phase)  # type: ignore[call-arg, misc]


def _accepts_phase(fn: Any) -> bool:
    if fn is None:
        return False
    if isinstance(fn, Reporter):
        return True
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "phase" or p.kind is p.VAR_KEYWORD for p in params)


class Reporter:
    """Progress of one long step: ``done/total`` units, the rate, the ETA and the phase.

    Callable as a :data:`ProgressFn` (``reporter(done, total, phase=None)``), so it can be
    handed to functions that take ``on_progress``. ``on_progress`` (optional) receives every
    update; ``show`` draws a tqdm bar on a terminal or prints plain lines to ``stream``
    (stderr) off one; ``logger`` gets the plain lines too. Use it as a context manager to run
    the heartbeat; closing it prints the total time.
    """

    def __init__(
        self,
        label: str,
        on_progress: ProgressFn | None = None,
        *,
        unit: str = "",
        total: int = 0,
        initial: int = 0,
        show: bool = False,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        interval_s: float = 30.0,
        line_every_s: float = 10.0,
        stream: TextIO | None = None,
    ):
        if interval_s <= 0 or line_every_s <= 0:
            raise ValueError(
                f"interval_s={interval_s}, line_every_s={line_every_s}: expected positive seconds"
            )
        self.label, self.unit = label, unit
        self.on_progress = on_progress
        self._pass_phase = _accepts_phase(on_progress)
        self.logger = logger
        self.interval_s, self.line_every_s = interval_s, line_every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.total = int(initial), int(total)
        self.phase: str | None = None
        self.extra = ""
        self._finished = False
        self._lock = threading.RLock()
        self._t0 = self._t_update = time.monotonic()
        self._rate_t0, self._rate_done = self._t0, self.done
        self._t_line = 0.0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._bar = None
        self._lines = bool(show) and not _isatty(self.stream)
        if show and not self._lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total or None,
                initial=self.done,
                desc=label,
                unit=unit or "it",
                leave=False,
                file=self.stream,
            )

    # -- updates ----------------------------------------------------------------------------
    def __call__(self, done: int, total: int, phase: str | None = None) -> None:
        self.update(done, total, phase)

    def update(self, done: int, total: int | None = None, phase: str | None = None) -> None:
        """``done`` of ``total`` units (``total`` None keeps the last), in ``phase`` (None keeps it)."""
        with self._lock:
            now = time.monotonic()
            counted = done != self.done
            new_phase = phase is not None and phase != self.phase
            if total is not None and total != self.total:
                self.total = int(total)
                if self._bar is not None:
                    self._bar.total = self.total or None
            if done < self.done:  # a restarted count: measure the rate afresh
                self._rate_t0, self._rate_done = now, done
            if self._bar is not None:
                self._bar.update(max(0, done - self.done))
                if new_phase:
                    self._bar.set_description(f"{self.label} [{phase}]", refresh=False)
            self.done = int(done)
            if phase is not None:
                self.phase = phase
            self._t_update = now
            finished = self.total > 0 and self.done >= self.total
            first_finish, self._finished = finished and not self._finished, finished
            if new_phase or first_finish or now - self._t_line >= self.line_every_s:
                self._emit(self.status())
        if self.on_progress is not None:
            if self._pass_phase:
                self.on_progress(self.done, self.total, phase=self.phase)
            elif counted:  # a two-argument callback hears of units of work only
                self.on_progress(self.done, self.total)

    def advance(self, n: int = 1, phase: str | None = None) -> None:
        """``n`` more units done."""
        self.update(self.done + n, None, phase)

    def postfix(self, **values: Any) -> None:
        """Extra values (a loss, an L0...) shown after the bar and at the end of each line."""
        with self._lock:
            self.extra = " ".join(f"{k}={v}" for k, v in values.items())
            if self._bar is not None:
                self._bar.set_postfix(values, refresh=False)

    def restart_clock(self) -> None:
        """Measure the rate from now on (after a wait that was not work, e.g. for a lock)."""
        with self._lock:
            self._rate_t0, self._rate_done = time.monotonic(), self.done

    def set_phase(self, phase: str) -> None:
        """Name what runs now (shown in every line) without counting a unit."""
        self.update(self.done, None, phase)

    # -- what is shown ----------------------------------------------------------------------
    def rate(self) -> float:
        """Units per second since the count (re)started."""
        dt = time.monotonic() - self._rate_t0
        return (self.done - self._rate_done) / dt if dt > 0 else 0.0

    def eta_s(self) -> float:
        """Seconds left at the current rate (NaN before the first unit)."""
        r = self.rate()
        if self.total <= 0 or r <= 0:
            return math.nan
        return max(self.total - self.done, 0) / r

    def status(self) -> str:
        """``label 4/13 steps (31%) | 0.02 steps/s | ETA 7m30s | phase``."""
        unit = f" {self.unit}" if self.unit else ""
        if self.total > 0:
            pct = 100.0 * min(self.done / self.total, 1.0)
            head = f"{self.label} {self.done}/{self.total}{unit} ({pct:.0f}%)"
        else:
            head = f"{self.label} {self.done}{unit}"
        r = self.rate()
        rate = f"{r:.3g}{unit or ' units'}/s"
        parts = [head, rate, f"ETA {format_duration(self.eta_s())}"]
        if self.phase:
            parts.append(self.phase)
        if self.extra:
            parts.append(self.extra)
        return " | ".join(parts)

    def _emit(self, line: str) -> None:
        self._t_line = time.monotonic()
        if self.logger is not None:
            self.logger.info(line)
        if self._lines:
            print(line, file=self.stream, flush=True)

    # -- heartbeat --------------------------------------------------------------------------
    def _beat(self, stop: threading.Event) -> None:
        tick = min(self.interval_s, 5.0)
        while not stop.wait(tick):
            with self._lock:
                now = time.monotonic()
                if now - self._t_line >= self.interval_s:
                    quiet = now - self._t_update
                    self._emit(
                        f"{self.status()} | still running, last update {format_duration(quiet)} ago"
                    )

    def __enter__(self) -> Reporter:
        with self._lock:  # the clock starts here: set-up before (a model load) is not work
            self._t0 = self._t_update = self._rate_t0 = time.monotonic()
            self._rate_done = self.done
        if self._thread is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._beat, args=(self._stop,), name=f"progress:{self.label}", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the heartbeat, close the bar and log the elapsed time."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = self._stop = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        with self._lock:
            took = format_duration(time.monotonic() - self._t0)
            if exc_type is None:
                self._emit(f"{self.label}: done in {took}")
            else:
                self._emit(f"{self.label}: stopped after {took} ({exc_type.__name__})")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
