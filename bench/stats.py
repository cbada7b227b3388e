"""Pure helpers: percentiles, spreads over runs, and the markdown the bench prints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as ``numpy.percentile``."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0-100")
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Spread:
    """One figure measured in several runs: its median and its range."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = list(values)
        return cls(percentile(values, 50), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.low * factor, self.high * factor, self.runs)

    def format(self, digits: int = 1, unit: str = "") -> str:
        """``12.3 (11.0–14.2)``; just the median when there was one run."""
        text = f"{self.median:.{digits}f}{unit}"
        if self.runs > 1:
            text += f" ({self.low:.{digits}f}–{self.high:.{digits}f})"
        return text


def spread_of_percentile(runs: Sequence[Sequence[float]], q: float) -> Spread:
    """The ``q``-th percentile of each run, summarised over the runs."""
    return Spread.of(percentile(run, q) for run in runs)


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """Run-by-run ratios (the i-th numerator over the i-th denominator)."""
    if len(numerators) != len(denominators):
        raise ValueError("ratios need as many numerators as denominators")
    return Spread.of(n / d for n, d in zip(numerators, denominators))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def steady_rate(times: Iterable[float], trim: float = 0.05) -> float:
    """Events per second between the ``trim`` and ``1 - trim`` quantiles of their times.

    Leaves out the ramp-up and the tail, so that a burst's rate is its steady state.
    """
    start, end, events = steady_window(times, trim)
    return events / (end - start)


def steady_window(times: Iterable[float], trim: float = 0.05) -> tuple[float, float, int]:
    """The times of the ``trim`` and ``1 - trim`` quantile events, and the events between them."""
    ordered = sorted(times)
    if len(ordered) < 3:
        raise ValueError("a rate needs at least three events")
    first = int(len(ordered) * trim)
    last = len(ordered) - 1 - first
    return ordered[first], ordered[last], last - first
