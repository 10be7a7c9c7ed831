"""Calibration of pass 2: a small logistic model over the evidence, and acceptance by a precision bound.

Written with numpy alone because the lean runtime ships neither scipy nor scikit-learn: a ridge-penalised
logistic regression fitted by Newton steps (a dozen features, a few thousand rows) and the exact
Clopper-Pearson lower bound from the binomial tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["LogisticModel", "acceptance_threshold", "clopper_pearson_lower", "fit_logistic", "grouped_folds"]


@dataclass
class LogisticModel:
    """Standardised features, weights and intercept: p = sigmoid(((x - mean) / scale) @ w + b)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    intercept: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Probability that a proposal is right, per row."""
        z = ((np.asarray(features, dtype=np.float64) - self.mean) / self.scale) @ self.weights + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))

    def to_dict(self) -> dict:
        """JSON-ready form (recorded with the run)."""
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "weights": self.weights.tolist(),
                "intercept": self.intercept}


def fit_logistic(features: np.ndarray, labels: np.ndarray, ridge: float = 1.0, steps: int = 25,
                 tol: float = 1e-5) -> LogisticModel:
    """Ridge-penalised logistic regression by Newton's method (the intercept is not penalised)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    scale = x.std(axis=0) if len(x) else np.ones(x.shape[1])
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], ridge)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -40, 40)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < tol:
            break
    return LogisticModel(mean, scale, w[:-1], float(w[-1]))


def _log_binom_tail(k: int, n: int, p: float) -> float:
    """log P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 0.0
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    log_fact = _log_factorials(n)
    j = np.arange(k, n + 1)
    log_terms = log_fact[n] - log_fact[j] - log_fact[n - j] + j * math.log(p) + (n - j) * math.log1p(-p)
    top = log_terms.max()
    return float(top + math.log(np.exp(log_terms - top).sum()))


_LOG_FACT = np.zeros(1)


def _log_factorials(n: int) -> np.ndarray:
    """log(i!) for i = 0..n (grown and cached)."""
    global _LOG_FACT
    if len(_LOG_FACT) <= n:
        _LOG_FACT = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, 2 * n + 2, dtype=np.float64)))])
    return _LOG_FACT


def clopper_pearson_lower(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound on a proportion after k successes in n trials."""
    if n <= 0 or k <= 0:
        return 0.0
    alpha = 1.0 - confidence
    if k == n:
        return alpha ** (1.0 / n)
    lo, hi = 0.0, k / n
    target = math.log(alpha)
    for _ in range(40):  # 2**-40: far below any precision a report shows
        mid = (lo + hi) / 2
        if _log_binom_tail(k, n, mid) < target:
            lo = mid
        else:
            hi = mid
    return lo


def acceptance_threshold(probabilities: np.ndarray, correct: np.ndarray, target: float,
                         confidence: float = 0.95) -> Optional[dict]:
    """The lowest probability threshold whose accepted rows reach `target` as a Clopper-Pearson bound.

    Rows are accepted from the most probable down; the largest accepted set whose lower bound reaches
    the target wins. Returns None when no set does (the level is switched off).
    """
    order = np.argsort(-np.asarray(probabilities, dtype=np.float64), kind="stable")
    probs = np.asarray(probabilities, dtype=np.float64)[order]
    ok = np.asarray(correct, dtype=bool)[order]
    hits = np.cumsum(ok)
    n = np.arange(1, len(ok) + 1)
    # A set can only be cut where the probability changes; and the bound is largest at the end of a run of hits.
    ends = np.flatnonzero((np.r_[probs[1:], -np.inf] < probs) & ok)
    ends = ends[hits[ends] / n[ends] >= target]
    # The Wilson bound is close to Clopper-Pearson and vectorised: only ends near the target get the exact test.
    z = 1.6448536269514722 if abs(confidence - 0.95) < 1e-12 else _z(confidence)
    p_hat = hits[ends] / n[ends]
    wilson = (p_hat + z * z / (2 * n[ends]) - z * np.sqrt(p_hat * (1 - p_hat) / n[ends] + z * z / (4 * n[ends] ** 2))) \
        / (1 + z * z / n[ends])
    ends = ends[wilson >= target - 0.02]
    for end in ends[::-1]:
        bound = clopper_pearson_lower(int(hits[end]), int(n[end]), confidence)
        if bound >= target:
            return {"threshold": float(probs[end]), "accepted": int(n[end]), "correct": int(hits[end]),
                    "precision": float(hits[end] / n[end]), "lower_bound": bound, "rows": int(len(ok))}
    return None


def _z(confidence: float) -> float:
    """One-sided standard normal quantile by bisection (no scipy in the lean runtime)."""
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return lo


def grouped_folds(groups: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """Fold number per row, whole groups (all views of one reference) kept in one fold."""
    names = sorted(set(groups))
    rng = np.random.default_rng(seed)
    assignment = {name: int(f) for name, f in zip(names, rng.permutation(len(names)) % max(1, folds))}
    return np.array([assignment[g] for g in groups], dtype=np.int64)
