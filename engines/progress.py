"""The one progress record every engine reports through its `progress` callback.

Engines know nothing of where it goes (a job row, a terminal, a notebook); the
caller decides how often to store it. A `point` is one sample of a curve (the
loss at a training step): callers append points, they never rewrite a history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    done: float
    total: float | None  # None while unknown
    unit: str  # what is counted: "steps", "queries", "conversations", "examples"
    elapsed: float = 0.0  # seconds since the work started (this attempt)
    eta_seconds: float | None = None
    rate: float | None = None  # units per second
    metrics: Mapping[str, float | int | str | None] = field(default_factory=dict)  # latest values
    point: Mapping[str, float | int | None] | None = None  # a curve sample to append, e.g. {"step", "loss"}

    @classmethod
    def since(
        cls,
        started: float,
        done: float,
        total: float | None,
        unit: str,
        *,
        rate_done: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        point: Mapping[str, Any] | None = None,
    ) -> Progress:
        """Progress with elapsed, rate and ETA measured from `started`
        (time.monotonic()). `rate_done` counts only the work done in this
        attempt when a resumed run starts from a non-zero `done`."""
        elapsed = max(0.0, time.monotonic() - started)
        counted = done if rate_done is None else rate_done
        rate = counted / elapsed if elapsed > 0 and counted > 0 else None
        eta = (total - done) / rate if rate and total is not None else None
        return cls(
            done=done,
            total=total,
            unit=unit,
            elapsed=elapsed,
            eta_seconds=eta,
            rate=rate,
            metrics=dict(metrics or {}),
            point=dict(point) if point is not None else None,
        )

    @property
    def fraction(self) -> float:
        if not self.total:
            return 0.0
        return min(1.0, max(0.0, self.done / self.total))

    def to_json(self) -> dict[str, Any]:
        """JSON-safe (non-finite floats become None); the point is not included."""

        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "done": clean(self.done),
            "total": clean(self.total),
            "unit": self.unit,
            "elapsed": round(self.elapsed, 1),
            "eta_seconds": clean(self.eta_seconds),
            "rate": clean(self.rate),
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Progress | None:
        if not data or "done" not in data:
            return None
        return cls(
            done=data.get("done") or 0,
            total=data.get("total"),
            unit=data.get("unit", ""),
            elapsed=data.get("elapsed") or 0.0,
            eta_seconds=data.get("eta_seconds"),
            rate=data.get("rate"),
            metrics=data.get("metrics") or {},
        )


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]
