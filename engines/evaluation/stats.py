"""Statistics over examples: means with bootstrap confidence intervals,
paired over the examples because every arm answers the same queries."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    value: float | None
    low: float | None
    high: float | None
    n: int
    note: str = ""


def _array(values: Sequence[float]) -> Any:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
        raise ValueError("values must be a flat list of finite numbers")
    return arr


def _bootstrap(
    data: tuple[Any, ...], statistic: Callable[..., Any], confidence: float, resamples: int, seed: int
) -> Any:
    """scipy's percentile bootstrap, paired: every resample draws the same
    example indices from each array."""
    import numpy as np
    from scipy import stats

    with warnings.catch_warnings():
        # Degenerate resamples (all equal) are expected with 0/1 metrics on few examples.
        warnings.simplefilter("ignore")
        # batch bounds memory: resamples x examples floats per array at once otherwise.
        return stats.bootstrap(
            data,
            statistic,
            n_resamples=resamples,
            confidence_level=confidence,
            method="percentile",
            paired=True,
            vectorized=True,
            batch=250,
            rng=np.random.default_rng(seed),
        )


def mean_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Estimate:
    """The mean with a bootstrap percentile confidence interval."""
    import numpy as np

    arr = _array(values)
    n = len(arr)
    if n == 0:
        return Estimate(None, None, None, 0, "no examples")
    mean = float(arr.mean())
    if n == 1 or np.all(arr == arr[0]):
        return Estimate(mean, mean, mean, n, "one example: no interval" if n == 1 else "")
    res = _bootstrap((arr,), lambda x, axis: np.mean(x, axis=axis), confidence, resamples, seed)
    return Estimate(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), n)


def _paired(*arrays: Sequence[float]) -> list[Any]:
    out = [_array(a) for a in arrays]
    if len({len(a) for a in out}) > 1:
        raise ValueError(f"paired lists must have the same length, got {', '.join(str(len(a)) for a in out)}")
    return out


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Estimate:
    """mean(a - b) over paired examples, with a paired bootstrap interval
    (resampling the differences is resampling the same indices of a and b)."""
    x, y = _paired(a, b)
    return mean_ci(list(x - y), confidence, resamples, seed)


def prompt_effect_retained(
    student: Sequence[float],
    floor: Sequence[float],
    teacher: Sequence[float],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """(mean(student) - mean(floor)) / (mean(teacher) - mean(floor)): the share
    of what the prompt adds to the base model that the student keeps without
    it (1.0 = all of it; above 1, the student beats the prompted base).

    The interval is a paired bootstrap over examples; resamples where the
    teacher is not above the floor have no ratio and are dropped (the note
    says how many). When the teacher is not above the floor on the full
    sample the ratio is undefined and value/low/high are None."""
    import numpy as np

    s, f, t = _paired(student, floor, teacher)
    n = len(s)
    if n == 0:
        return Estimate(None, None, None, 0, "no examples")
    gain, base = float(s.mean() - f.mean()), float(t.mean() - f.mean())
    if base <= 0:
        return Estimate(
            None,
            None,
            None,
            n,
            f"the prompted base is not better than the floor on this metric "
            f"(teacher {t.mean():.2f} vs floor {f.mean():.2f}): compare absolute scores instead",
        )
    value = gain / base
    if n == 1:
        return Estimate(value, value, value, n, "one example: no interval")

    def gains(s_: Any, f_: Any, t_: Any, axis: int) -> Any:
        return np.stack([s_.mean(axis=axis) - f_.mean(axis=axis), t_.mean(axis=axis) - f_.mean(axis=axis)])

    res = _bootstrap((s, f, t), gains, confidence, resamples, seed)
    num, den = res.bootstrap_distribution
    kept = den > 0
    dropped = int((~kept).sum())
    note = (
        f"{dropped} of {resamples} resamples dropped: the teacher was not above the floor in them"
        if dropped
        else ""
    )
    if not kept.any():
        return Estimate(value, None, None, n, note)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(num[kept] / den[kept], [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high), n, note)


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and 95th percentile of request latencies (None when empty)."""
    import numpy as np

    arr = _array(seconds)
    if len(arr) == 0:
        return {"mean": None, "p50": None, "p95": None}
    p50, p95 = np.percentile(arr, [50, 95])
    return {"mean": float(arr.mean()), "p50": float(p50), "p95": float(p95)}


def judge_human_agreement(judge: Sequence[float], human: Sequence[float]) -> dict[str, Any]:
    """How far the LLM judge agrees with human ratings of the same answers:
    Spearman's rank correlation and Cohen's kappa (quadratic weights, on
    scores rounded to whole numbers). None where undefined (fewer than 3
    pairs, or scores that never vary), with a note."""
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    j, h = _paired(judge, human)
    n = len(j)
    if n < 3:
        return {
            "n": n,
            "spearman": None,
            "cohen_kappa": None,
            "note": f"{n} rated pairs: at least 3 are needed",
        }
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: both say so by returning NaN
        rho = float(spearmanr(j, h).statistic)
        kappa = float(cohen_kappa_score(j.round().astype(int), h.round().astype(int), weights="quadratic"))
    if math.isnan(rho):
        notes.append("Spearman is undefined when the judge's or the humans' scores never vary")
    if math.isnan(kappa):
        notes.append("Cohen's kappa is undefined when both give one and the same score throughout")
    return {
        "n": n,
        "spearman": None if math.isnan(rho) else rho,
        "cohen_kappa": None if math.isnan(kappa) else kappa,
        "note": "; ".join(notes),
    }
