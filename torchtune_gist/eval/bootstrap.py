"""Paired bootstrap intervals of mean scores and of the share of the control gap, from per-example scores.

Runs evaluated on the same examples are resampled together (the same examples drawn for every run), so an interval
of a difference or a ratio of runs reflects how the runs differ on each example, not how hard the examples are.
"""

from typing import Optional, Sequence, Tuple

import numpy as np

#: Resamples drawn unless told otherwise.
BOOTSTRAP_ITERS = 2000

Interval = Tuple[float, float]


def resampled_means(scores: np.ndarray, *, iters: int = BOOTSTRAP_ITERS, seed: int = 0, chunk: int = 250) -> np.ndarray:
    """Means of each run's scores over ``iters`` resamples (with replacement) of the examples.

    Args:
        scores: ``[runs, examples]``, one row per run, the same example in each column.
        iters: resamples drawn.
        seed: the generator's seed (the same seed draws the same resamples).
        chunk: resamples drawn at a time (memory: ``chunk * examples`` counts).

    Returns:
        ``[runs, iters]``: column ``b`` holds every run's mean over resample ``b``.

    Raises:
        ValueError: if ``scores`` is not 2-D with at least one example, or ``iters`` < 1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [runs, examples] with at least one example, got shape {scores.shape}")
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1")
    rng = np.random.default_rng(seed)
    n = scores.shape[1]
    means = []
    for start in range(0, iters, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, iters - start))
        means.append(scores @ counts.T / n)
    return np.concatenate(means, axis=1)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> Optional[Interval]:
    """The central ``level`` interval of ``values`` (NaNs left out); ``None`` if all are NaN."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def mean_interval(
    scores: Sequence[float], *, iters: int = BOOTSTRAP_ITERS, seed: int = 0, level: float = 0.95
) -> Optional[Interval]:
    """Bootstrap interval of the mean of one run's per-example ``scores`` (``None`` if a score is NaN)."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        return None
    return percentile_interval(resampled_means(scores[None], iters=iters, seed=seed)[0], level)


def gap_share_interval(
    run: Sequence[float],
    pos: Sequence[float],
    neg: Sequence[float],
    *,
    iters: int = BOOTSTRAP_ITERS,
    seed: int = 0,
    level: float = 0.95,
) -> Optional[Interval]:
    """Paired bootstrap interval of ``(mean(run) - mean(neg)) / (mean(pos) - mean(neg))``.

    Args:
        run, pos, neg: per-example scores of the run and the two controls, the same examples in the same order.

    Returns:
        The interval over the resamples where the controls differ, or ``None`` if they tie in every resample.

    Raises:
        ValueError: if the three do not hold the same number of examples.
    """
    if not len(run) == len(pos) == len(neg):
        raise ValueError(f"run, pos and neg need the same examples, got {len(run)}, {len(pos)} and {len(neg)} scores")
    run, pos, neg = (np.asarray(x, dtype=np.float64) for x in (run, pos, neg))
    lead, gap = resampled_means(np.stack([run - neg, pos - neg]), iters=iters, seed=seed)
    shares = np.full_like(gap, np.nan)
    np.divide(lead, gap, out=shares, where=gap != 0)
    return percentile_interval(shares, level)
