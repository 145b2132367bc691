"""Benchmarks (docs/design.md §10.5, §12): measured, never asserted in tests.

`library` measures through the client library against a running cluster; `fs` measures
through any directory, so the same operations run on a dfs mount and on local disk side by
side. `dfs bench` and scripts/bench* drive them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Measure:
    """One benchmark result; `rate` in `unit`, with optional latency percentiles."""

    name: str
    rate: float
    unit: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rate": round(self.rate, 2), "unit": self.unit,
                "seconds": round(self.seconds, 4), **self.extra}


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0
