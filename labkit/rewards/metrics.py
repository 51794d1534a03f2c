"""How good is a reward model? Accuracy, AUROC, calibration and rank correlation with the true return.

    accuracy      fraction of examples on the right side of a threshold
    auroc         P(a random positive scores above a random negative), ties counting 1/2 (Mann-Whitney U)
    reliability   per-bin mean confidence, observed frequency and count: the reliability diagram
    ece           expected calibration error: sum over bins of (n_b / N) |frequency_b - confidence_b|
    rank_corr     Spearman's rho between predicted and true returns (labkit.eval.spearman)

AUROC says whether the model *ranks* outcomes right (what a sparse RL reward needs at its threshold);
ECE says whether its probabilities can be read as probabilities.
"""

from __future__ import annotations

import numpy as np

from labkit.eval import spearman


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(labels, float).ravel(), np.asarray(scores, float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if y.size == 0:
        raise ValueError("need at least one example")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1 (False/True)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def accuracy(labels, scores, threshold: float = 0.5) -> float:
    """Fraction of examples where (score >= threshold) equals the label."""
    y, s = _labels_scores(labels, scores)
    return float(((s >= threshold) == (y == 1)).mean())


def average_ranks(x) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their positions (O(n log n))."""
    _, inverse, counts = np.unique(np.asarray(x, float), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def auroc(labels, scores) -> float:
    """Area under the ROC curve by ranks: (sum of the positives' ranks - n+(n+ + 1)/2) / (n+ n-).
    A tie between a positive and a negative counts one half. Needs both classes."""
    y, s = _labels_scores(labels, scores)
    pos, neg = int(y.sum()), int((1 - y).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {pos} and {neg}")
    r = average_ranks(s)
    return float((r[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def reliability(labels, probs, bins: int = 10) -> dict[str, np.ndarray]:
    """The reliability diagram's numbers over `bins` equal-width bins of [0, 1] (1.0 falls in the last):
    edges [bins+1], confidence (mean predicted probability) [bins], frequency (fraction of positives)
    [bins], count [bins]. Empty bins hold NaN confidence and frequency."""
    y, p = _labels_scores(labels, probs)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, p, bins) / count
        freq = np.bincount(which, y, bins) / count
    return {"edges": edges, "confidence": conf, "frequency": freq, "count": count}


def ece(labels, probs, bins: int = 10) -> float:
    """Expected calibration error: sum over non-empty bins of (count / N) * |frequency - confidence|."""
    r = reliability(labels, probs, bins)
    full = r["count"] > 0
    return float((r["count"][full] / r["count"].sum() * np.abs(r["frequency"] - r["confidence"])[full]).sum())


def rank_correlation(true_returns, predicted) -> float:
    """Spearman's rho between true and predicted returns: does the model order episodes as the task does?"""
    return spearman(true_returns, predicted)


def classification_report(labels, probs, threshold: float = 0.5, bins: int = 10) -> dict[str, float]:
    """accuracy, auroc, ece, and the counts of positives and negatives, in one dict."""
    y, _ = _labels_scores(labels, probs)
    return {"accuracy": accuracy(labels, probs, threshold), "auroc": auroc(labels, probs),
            "ece": ece(labels, probs, bins), "positives": int(y.sum()), "negatives": int((1 - y).sum())}
