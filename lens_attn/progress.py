"""Progress of long work: a tqdm bar on a terminal, elsewhere one line per stage with its time.

Every long loop in lens-attn reports through :func:`progress_bar`, so the decision is made here
once. On a terminal (``sys.stderr.isatty()``) it is tqdm's bar. Anywhere else (a log file, CI, a
notebook's captured stderr) a bar's carriage returns pile up into unreadable lines, so the stage
prints a single line when it ends::

    loading layers: 32/32 layers in 41.3 s

``enabled=False`` (the CLI's ``--quiet``, ``progress=False`` in the API) prints nothing.

    >>> total = 0
    >>> for step in progress_bar(range(3), desc="demo", unit="step", enabled=False):
    ...     total += step
    >>> total
    3
"""

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any


def on_terminal() -> bool:
    """Whether progress goes to a terminal (bars) or somewhere else (one line per stage)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
) -> Any:
    """A progress reporter with tqdm's interface (iterate it, or ``update(n)`` and ``close()``).

    Args:
        iterable: what to iterate over, or None to call ``update`` by hand.
        total: the number of steps (default ``len(iterable)`` where it has one).
        desc: the stage's name, e.g. ``"scoring heads"``.
        unit: what one step is, e.g. ``"batch"``.
        enabled: False reports nothing.
    """
    if enabled and on_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit)
    return StageLine(iterable, total=total, desc=desc, unit=unit, enabled=enabled)


class StageLine:
    """tqdm's interface, reporting one line (steps and seconds) on ``close()`` or at the end."""

    def __init__(
        self,
        iterable: Iterable | None,
        *,
        total: int | None,
        desc: str,
        unit: str,
        enabled: bool = True,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.enabled, self.n, self.start, self.closed = enabled, 0, time.perf_counter(), False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.n += 1
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        """Accepted for tqdm compatibility; the closing line has no room for it."""

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            of = f"/{self.total}" if self.total is not None else ""
            elapsed = time.perf_counter() - self.start
            print(f"{self.desc}: {self.n}{of} {self.unit} in {elapsed:.1f} s", file=sys.stderr)

    def __enter__(self) -> "StageLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
