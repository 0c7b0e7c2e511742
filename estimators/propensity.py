"""Propensity scores: a cross-validated L1 logistic model, and the quantities built on it.

Everything here takes arrays (a scipy.sparse CSR or dense covariate matrix, a 0/1 treatment
vector, propensity scores) and returns arrays or numbers. Conventions follow OHDSI CohortMethod
(preference score, equipoise, per-arm cap of the fitting sample, intercept correction).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.special import expit, logit
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from estimators.errors import EstimationError

MIN_PERSONS_PER_ARM = 10
"""Fewer persons than this in an arm and no propensity model is fitted."""

INTERCEPT_SCALING = 1000.0
"""liblinear penalises the intercept as a covariate of this constant value; large = ~unpenalised."""

PS_EPS = 1e-9
"""Fitted scores are clipped to [PS_EPS, 1 - PS_EPS]."""

DEFAULT_GRID_DECADES = 4
DEFAULT_GRID_PER_DECADE = 3
EARLY_STOP_AFTER = 2
"""The CV walk stops once this many consecutive grid points are worse than the best so far."""

MAX_PER_ARM = 250_000
"""Default cap on each arm of the final fitting sample (OHDSI CohortMethod downsamples to 250k)."""

LIBLINEAR_TOL = 1e-4
LIBLINEAR_MAX_ITER = 1000

Estimand = Literal["ATE", "ATT", "ATO"]
Selection = Literal["likelihood", "balance"]


@dataclass(frozen=True, eq=False)
class PropensityFit:
    """A fitted propensity model: scores for every row plus how the penalty was chosen."""

    ps: np.ndarray
    """P(treated | X) per row, clipped to [PS_EPS, 1 - PS_EPS]."""
    C: float
    """Inverse regularisation strength of the final fit (scikit-learn's C = 1/(n_fit * lambda))."""
    lambda_: float
    """Chosen per-sample L1 penalty (independent of the number of rows)."""
    lambdas_tried: np.ndarray
    """Per-sample penalties evaluated by CV, strongest first (the walk may stop early)."""
    cv_log_loss: np.ndarray
    """Mean held-out log loss per person at each of `lambdas_tried`."""
    auc: float
    """In-sample c-statistic of `ps` for treatment."""
    n_nonzero: int
    """Non-zero covariate coefficients (intercept excluded)."""
    coef: np.ndarray
    intercept: float
    """Intercept on the scale of the full population (corrected when arms were subsampled)."""
    n_cv_rows: int
    n_fit_rows: int
    selection: Selection = "likelihood"
    """How the penalty was chosen: held-out log loss ("likelihood") or fewest covariates
    imbalanced after IPTW ("balance"; `cv_log_loss` is then empty and `n_cv_rows` 0)."""
    n_imbalanced: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    """Balance selection: covariates with |SMD| > IMBALANCE_SMD after IPTW at each penalty."""
    path_auc: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Balance selection: c-statistic of the scores at each penalty (the tie-break)."""


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def as_treated(treated: np.ndarray, n: int | None = None) -> np.ndarray:
    """Return `treated` as an int8 0/1 vector, raising EstimationError if it is not one."""
    t = np.asarray(treated)
    if t.ndim != 1:
        raise EstimationError(f"treatment must be a 1-D vector, got shape {t.shape}")
    if n is not None and t.shape[0] != n:
        raise EstimationError(
            f"covariates have {n} rows but the treatment vector has {t.shape[0]}"
        )
    if t.dtype == bool:
        return t.astype(np.int8)
    if not np.issubdtype(t.dtype, np.number) or not np.all((t == 0) | (t == 1)):
        raise EstimationError("treatment must be binary (0 = comparator, 1 = treated)")
    return t.astype(np.int8)


def as_covariates(X) -> sp.csr_matrix | np.ndarray:
    """Return X as float64 CSR (if sparse) or a float64 2-D array; reject NaN/inf."""
    if sp.issparse(X):
        if X.ndim != 2:
            raise EstimationError(f"covariates must be 2-D, got shape {X.shape}")
        X = sp.csr_matrix(X, dtype=np.float64)
        values = X.data
    else:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise EstimationError(f"covariates must be 2-D, got shape {X.shape}")
        values = X
    if not np.isfinite(values).all():
        raise EstimationError("covariates contain NaN or infinite values")
    return X


def _check_arms(t: np.ndarray, minimum: int) -> tuple[int, int]:
    n1 = int(t.sum())
    n0 = int(t.shape[0] - n1)
    for name, count in (("treated", n1), ("comparator", n0)):
        if count == 0:
            raise EstimationError(f"the {name} arm is empty")
        if count < minimum:
            raise EstimationError(
                f"too few persons in the {name} arm (at least {minimum} are needed to fit "
                "a propensity model)"  # the count itself lives in the masked n_ columns
            )
    return n1, n0


def check_ps(ps: np.ndarray, n: int, *, open_interval: bool) -> np.ndarray:
    ps = np.asarray(ps, dtype=np.float64)
    if ps.ndim != 1 or ps.shape[0] != n:
        raise EstimationError(f"propensity scores must be a vector of length {n}")
    if open_interval:
        ok = (ps > 0) & (ps < 1)
        bounds = "strictly between 0 and 1"
    else:
        ok = (ps >= 0) & (ps <= 1)
        bounds = "between 0 and 1"
    if not ok.all():
        raise EstimationError(f"propensity scores must be {bounds} (found NaN or out of range)")
    return ps


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def content_order(X, t: np.ndarray) -> np.ndarray:
    """Row indices sorted by a hash of each row's covariates and treatment: an order that does
    not depend on how persons are numbered or listed (issue #16), so CV folds and subsamples
    drawn in it give the same model when person ids are relabelled. Equal rows are
    interchangeable, so their relative order does not matter; columns constant over the rows
    are left out, so adding one changes nothing."""
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)
    values = np.asarray(X.data, dtype=np.float64)
    cells = _mix64(X.indices.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                   ^ values.view(np.uint64))
    cells[_constant_columns(X, values)[X.indices]] = 0  # they tell no row from another
    running = np.concatenate([np.zeros(1, np.uint64), np.cumsum(cells, dtype=np.uint64)])
    rows = running[X.indptr[1:]] - running[X.indptr[:-1]]  # wraps: an order-free row sum
    return np.argsort(_mix64(rows ^ t.astype(np.uint64)), kind="stable")


def _constant_columns(X: sp.csr_matrix, values: np.ndarray) -> np.ndarray:
    """Per column: True when every row holds the same non-zero value (recorded for everyone)."""
    n, cols = X.shape
    count = np.bincount(X.indices, minlength=cols)
    total = np.bincount(X.indices, weights=values, minlength=cols)
    squares = np.bincount(X.indices, weights=values * values, minlength=cols)
    return (count == n) & np.isclose(squares * n, total * total)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: well-spread 64-bit hashes (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stratified_subsample(
    t: np.ndarray, max_rows: int | None, rng: np.random.Generator
) -> np.ndarray | None:
    """Row indices (sorted) of a subsample keeping the treated share, or None if all fit."""
    n = t.shape[0]
    if max_rows is None or n <= max_rows:
        return None
    keep = []
    for arm in (0, 1):
        idx = np.flatnonzero(t == arm)
        k = max(MIN_PERSONS_PER_ARM, round(idx.size * max_rows / n))
        keep.append(rng.choice(idx, size=min(k, idx.size), replace=False))
    return np.sort(np.concatenate(keep))


def _cap_per_arm(
    t: np.ndarray, max_per_arm: int | None, rng: np.random.Generator
) -> np.ndarray | None:
    """Row indices (sorted) with each arm capped at max_per_arm, or None if no arm exceeds it."""
    if max_per_arm is None:
        return None
    arms = [np.flatnonzero(t == arm) for arm in (0, 1)]
    if all(idx.size <= max_per_arm for idx in arms):
        return None
    keep = [
        rng.choice(idx, size=max_per_arm, replace=False) if idx.size > max_per_arm else idx
        for idx in arms
    ]
    return np.sort(np.concatenate(keep))


def _lambda_max(X, t: np.ndarray) -> float:
    """Smallest per-sample L1 penalty at which every coefficient is zero (intercept free)."""
    r = t - t.mean()
    grad = X.T @ r
    return float(np.abs(grad).max()) / t.shape[0] if grad.size else 0.0


def default_grid(lambda_max: float) -> np.ndarray:
    """Per-sample penalties from lambda_max (all-zero model) down 4 decades, 3 per decade."""
    steps = DEFAULT_GRID_DECADES * DEFAULT_GRID_PER_DECADE
    return lambda_max * 10.0 ** (-np.arange(steps + 1) / DEFAULT_GRID_PER_DECADE)


_LIBLINEAR_LOCK = threading.Lock()
"""scikit-learn's liblinear draws its coordinate order from one process-global RNG, so fits in
concurrent threads perturb each other's results; serialising them keeps fits reproducible."""


def fit_l1_logistic(C: float, seed: int, X, y: np.ndarray) -> LogisticRegression:
    """L1 logistic regression at a given C, configured and serialised as every PS fit here."""
    model = LogisticRegression(
        l1_ratio=1.0, solver="liblinear", C=C, intercept_scaling=INTERCEPT_SCALING,
        tol=LIBLINEAR_TOL, max_iter=LIBLINEAR_MAX_ITER, random_state=seed,
    )
    with _LIBLINEAR_LOCK:
        return model.fit(X, y)


def _linear_predictor(X, coef: np.ndarray, intercept: float) -> np.ndarray:
    return np.asarray(X @ coef).ravel() + intercept


def _sum_log_loss(y: np.ndarray, z: np.ndarray) -> float:
    """Sum of the logistic log loss for labels y and linear predictor z (numerically stable)."""
    return float(np.sum(np.logaddexp(0.0, z) - y * z))


@dataclass(frozen=True, eq=False)
class _Fold:
    """One cross-validation split, with the penalty above which its model is intercept-only."""

    X_train: sp.csr_matrix | np.ndarray
    y_train: np.ndarray
    X_test: sp.csr_matrix | np.ndarray
    y_test: np.ndarray

    @cached_property
    def lambda_max(self) -> float:
        return _lambda_max(self.X_train, self.y_train.astype(np.float64))

    def held_out_loss(self, lam: float, seed: int) -> float:
        """Summed test-fold log loss of the model fitted on the training rows at penalty lam.

        At or above lambda_max every coefficient is zero, so the fit is the intercept-only
        model: the training log odds (liblinear's near-free intercept, scaled by
        INTERCEPT_SCALING, lands within ~1e-3 of it), with no solver call.
        """
        if lam >= self.lambda_max:
            z = np.full(self.y_test.shape[0], logit(self.y_train.mean()))
        else:
            m = fit_l1_logistic(1.0 / (self.y_train.shape[0] * lam), seed, self.X_train,
                                self.y_train)
            z = _linear_predictor(self.X_test, m.coef_[0], m.intercept_[0])
        return _sum_log_loss(self.y_test, z)


def fit_propensity(
    X,
    treated: np.ndarray,
    *,
    seed: int = 0,
    n_folds: int = 3,
    max_cv_rows: int | None = 100_000,
    max_fit_rows: int | None = MAX_PER_ARM,
    grid: Sequence[float] | None = None,
    selection: Selection = "likelihood",
) -> PropensityFit:
    """Fit an L1 logistic propensity model with the penalty chosen by early-stopped K-fold CV.

    The grid is of per-sample penalties lambda (C = 1/(n_train * lambda)), so it means the same at
    any n; CV runs on a stratified subsample, the final fit on all rows (arms capped per arm).
    selection="balance" chooses the penalty by covariate balance instead (fit_by_balance).
    """
    X = as_covariates(X)
    t = as_treated(treated, X.shape[0])
    _check_arms(t, max(MIN_PERSONS_PER_ARM, n_folds))
    if n_folds < 2:
        raise EstimationError(f"n_folds must be at least 2, got {n_folds}")
    order = content_order(X, t)  # folds and subsamples drawn in it: ids do not matter
    fit = _fit_in_content_order(X[order], t[order], seed=seed, n_folds=n_folds,
                                max_cv_rows=max_cv_rows, max_fit_rows=max_fit_rows, grid=grid,
                                selection=selection)
    ps = np.empty_like(fit.ps)
    ps[order] = fit.ps  # back in the caller's row order
    return replace(fit, ps=ps)


def _fit_in_content_order(X, t: np.ndarray, *, seed: int, n_folds: int,
                          max_cv_rows: int | None, max_fit_rows: int | None,
                          grid: Sequence[float] | None, selection: Selection) -> PropensityFit:
    """fit_propensity on rows already in content order (so fold and subsample draws depend on
    the data, not on how persons are numbered)."""
    rng = np.random.default_rng(seed)
    if selection == "balance":
        return fit_by_balance(X, t, seed=seed, max_fit_rows=max_fit_rows, grid=grid, rng=rng)
    if selection != "likelihood":
        raise ValueError(f"unknown selection {selection!r} (likelihood or balance)")

    # Cross-validation on a stratified subsample.
    cv_idx = _stratified_subsample(t, max_cv_rows, rng)
    Xcv, tcv = (X, t) if cv_idx is None else (X[cv_idx], t[cv_idx])
    n_cv = tcv.shape[0]
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = [
        _Fold(Xcv[tr], tcv[tr], Xcv[te], tcv[te])
        for tr, te in splitter.split(np.zeros((n_cv, 1)), tcv)
    ]
    lambdas = (
        default_grid(max(f.lambda_max for f in folds)) if grid is None
        else np.sort(np.asarray(grid, dtype=np.float64))[::-1]
    )
    if lambdas.size == 0 or not np.all(np.isfinite(lambdas)) or np.any(lambdas < 0):
        raise EstimationError("the penalty grid must hold finite non-negative values")
    lambdas = lambdas[lambdas > 0]
    if X.shape[1] == 0 or lambdas.size == 0:
        return _null_fit(t, X.shape[1], n_cv)

    losses: list[float] = []
    best = 0
    for k, lam in enumerate(lambdas):
        losses.append(sum(fold.held_out_loss(lam, seed) for fold in folds) / n_cv)
        if losses[k] < losses[best]:
            best = k
        elif k - best >= EARLY_STOP_AFTER:
            break
    lam = float(lambdas[best])

    # Final fit on all rows, or on each arm capped at max_fit_rows, then predict for all rows.
    fit_idx = _cap_per_arm(t, max_fit_rows, rng)
    Xf, tf = (X, t) if fit_idx is None else (X[fit_idx], t[fit_idx])
    point = _fit_at(lam, seed, Xf, tf, X, t)
    return _finish(point, t, lambdas=np.asarray(lambdas[: len(losses)]),
                   cv_log_loss=np.asarray(losses), n_cv_rows=n_cv, n_fit_rows=int(tf.shape[0]))


@dataclass(frozen=True, eq=False)
class _PathPoint:
    """One L1 fit at penalty lambda_ on the fitting rows, with its linear predictor for all rows."""

    lambda_: float
    C: float
    coef: np.ndarray
    intercept: float
    """On the scale of the full population (corrected when arms were subsampled)."""
    z: np.ndarray


def _fit_at(lam: float, seed: int, Xf, tf: np.ndarray, X, t: np.ndarray,
            lambda_max: float | None = None) -> _PathPoint:
    """Fit at penalty lam on (Xf, tf) and score every row of X; at or above lambda_max (when
    given) the model is intercept-only, so no solver call is made."""
    C = 1.0 / (tf.shape[0] * lam)
    if lambda_max is not None and lam >= lambda_max:
        coef, intercept = np.zeros(X.shape[1]), float(logit(t.mean()))
    else:
        model = fit_l1_logistic(C, seed, Xf, tf)
        coef = model.coef_[0].copy()
        intercept = float(model.intercept_[0])
        if tf.shape[0] != t.shape[0]:
            # King & Zeng (2001) eq. 7, as CohortMethod: undo the change in treated odds by
            # sampling.
            intercept -= logit(tf.mean()) - logit(t.mean())
    return _PathPoint(lam, C, coef, intercept, _linear_predictor(X, coef, intercept))


def _finish(point: _PathPoint, t: np.ndarray, **fields) -> PropensityFit:
    """The PropensityFit of a chosen path point; raises if its scores separate the arms."""
    z = point.z
    if z[t == 0].max() < z[t == 1].min():
        raise EstimationError(
            "propensity model separates the arms perfectly (AUC 1.00): no overlap to compare"
        )
    ps = np.clip(expit(z), PS_EPS, 1.0 - PS_EPS)
    lambdas = fields.pop("lambdas")
    return PropensityFit(
        ps=ps, C=point.C, lambda_=point.lambda_, lambdas_tried=lambdas, auc=auc(ps, t),
        n_nonzero=int(np.count_nonzero(point.coef)), coef=point.coef,
        intercept=point.intercept, **fields,
    )


AUC_TIE = 0.005
"""Balance selection: AUCs closer than this count as tied. Along the weak end of the penalty
path the in-sample AUC creeps up by thousandths while the fits get slower and overfit."""


def choose_by_balance(n_imbalanced: Sequence[int], aucs: Sequence[float]) -> int:
    """Index of the penalty with the fewest imbalanced covariates; ties go to the higher AUC (as
    Zang et al. 2023), AUCs within AUC_TIE of the best counting as tied, then to the earlier,
    stronger penalty."""
    n = np.asarray(n_imbalanced)
    if n.size == 0 or n.size != len(aucs):
        raise ValueError("one imbalanced count and one AUC per penalty are needed")
    fewest = np.flatnonzero(n == n.min())
    auc_values = np.asarray(aucs, dtype=np.float64)[fewest]
    return int(fewest[auc_values >= auc_values.max() - AUC_TIE][0])


def balance_walk_done(n_imbalanced: Sequence[int], aucs: Sequence[float]) -> bool:
    """Stop the balance walk once every covariate balances and the last EARLY_STOP_AFTER
    penalties have not raised the AUC by AUC_TIE over the balanced fits before them: no weaker
    penalty could then be chosen."""
    if len(n_imbalanced) <= EARLY_STOP_AFTER or n_imbalanced[-1] != 0:
        return False
    earlier = [a for a, c in zip(aucs[:-EARLY_STOP_AFTER], n_imbalanced[:-EARLY_STOP_AFTER],
                                 strict=True) if c == 0]
    return bool(earlier) and max(aucs[-EARLY_STOP_AFTER:]) < max(earlier) + AUC_TIE


def _checked_grid(grid: Sequence[float] | None, lambda_max: Callable[[], float]) -> np.ndarray:
    """Positive penalties, strongest first: the default grid from lambda_max, or the given one."""
    lambdas = (default_grid(lambda_max()) if grid is None
               else np.sort(np.asarray(grid, dtype=np.float64))[::-1])
    if lambdas.size == 0 or not np.all(np.isfinite(lambdas)) or np.any(lambdas < 0):
        raise EstimationError("the penalty grid must hold finite non-negative values")
    return lambdas[lambdas > 0]


BALANCE_WALK_PER_ARM = 50_000
"""Balance selection fits each penalty of its walk on at most this many persons per arm (each
model scored and balanced on every person), and keeps the chosen fit as it is: the model whose
balance was measured is the one used. A dozen fits per trial on every person made the largest
trials of a 1M-person screen cost tens of seconds each; OHDSI downsamples to 250,000 per arm
for the same reason."""


def fit_by_balance(
    X, t: np.ndarray, *, seed: int, max_fit_rows: int | None,
    grid: Sequence[float] | None, rng: np.random.Generator,
) -> PropensityFit:
    """Choose the L1 penalty that leaves the fewest covariates with |SMD| > 0.1 after IPTW.

    Zang et al. (2023): balance, not likelihood, is what the PS model is for. Each penalty of the
    grid is fitted once on the walk's rows (arms capped at BALANCE_WALK_PER_ARM within the
    fitting rows, which are capped at max_fit_rows); balance is measured on every row of X with
    the pipeline's truncated stabilised ATE weights, and the chosen fit is the final model. The
    count need not be monotone along the path, so the walk stops early only once every covariate
    balances and the AUC has stopped rising (balance_walk_done); penalties at or above the walk's
    lambda_max are intercept-only and cost no solver call.
    """
    # Imported here: both modules import this one.
    from estimators.balance import count_imbalanced, covariate_balance
    from estimators.hazard import truncated_iptw_weights

    fit_idx = _cap_per_arm(t, max_fit_rows, rng)
    Xf, tf = (X, t) if fit_idx is None else (X[fit_idx], t[fit_idx])
    walk_idx = _cap_per_arm(tf, BALANCE_WALK_PER_ARM, rng)
    Xw, tw = (Xf, tf) if walk_idx is None else (Xf[walk_idx], tf[walk_idx])
    lambda_max = _lambda_max(Xw, tw.astype(np.float64))
    lambdas = _checked_grid(grid, lambda: lambda_max)
    if X.shape[1] == 0 or lambdas.size == 0:
        return replace(_null_fit(t, X.shape[1], 0), selection="balance")
    points, counts, aucs = [], [], []
    for lam in lambdas:
        point = _fit_at(float(lam), seed, Xw, tw, X, t, lambda_max)
        ps = np.clip(expit(point.z), PS_EPS, 1.0 - PS_EPS)
        counts.append(count_imbalanced(covariate_balance(X, t, truncated_iptw_weights(ps, t))))
        aucs.append(auc(ps, t))
        points.append(replace(point, z=np.empty(0)))  # keep coefficients, not n-long arrays
        if balance_walk_done(counts, aucs):
            break
    best = points[choose_by_balance(counts, aucs)]
    best = replace(best, z=_linear_predictor(X, best.coef, best.intercept))
    return _finish(best, t, lambdas=np.asarray(lambdas[:len(points)]), cv_log_loss=np.empty(0),
                   n_cv_rows=0,
                   n_fit_rows=int(tw.shape[0]), selection="balance",
                   n_imbalanced=np.asarray(counts, dtype=np.int64), path_auc=np.asarray(aucs))


def _null_fit(t: np.ndarray, n_cols: int, n_cv: int) -> PropensityFit:
    """Intercept-only model, used when there are no covariates to fit."""
    p = float(t.mean())
    return PropensityFit(
        ps=np.full(t.shape[0], p), C=math.nan, lambda_=math.nan,
        lambdas_tried=np.empty(0), cv_log_loss=np.empty(0), auc=0.5, n_nonzero=0,
        coef=np.zeros(n_cols), intercept=float(logit(p)), n_cv_rows=n_cv,
        n_fit_rows=int(t.shape[0]),
    )


# --------------------------------------------------------------------------------------------
# Diagnostics and adjustment built on the scores
# --------------------------------------------------------------------------------------------


def auc(scores: np.ndarray, treated: np.ndarray) -> float:
    """C-statistic of scores for treatment: Mann-Whitney U with ties counted half (= ROC AUC)."""
    s = np.asarray(scores, dtype=np.float64)
    t = as_treated(treated, s.shape[0] if s.ndim == 1 else None)
    n1 = int(t.sum())
    n0 = t.shape[0] - n1
    if n1 == 0 or n0 == 0:
        raise EstimationError("the AUC needs persons in both arms")
    if np.isnan(s).any():
        raise EstimationError("scores contain NaN")
    ranks = rankdata(s)  # average ranks for ties
    u = ranks[t == 1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def preference_score(ps: np.ndarray, treated: np.ndarray) -> np.ndarray:
    """Walker et al. (2013) preference score: logit(F) = logit(ps) - logit(share treated).

    It removes the effect of the arms' relative sizes so 0.5 means 'as likely as average'.
    """
    t = as_treated(treated)
    ps = check_ps(ps, t.shape[0], open_interval=False)
    share = float(t.mean()) if t.size else math.nan
    if not 0.0 < share < 1.0:
        raise EstimationError("the preference score needs persons in both arms")
    with np.errstate(divide="ignore"):
        return expit(logit(ps) - logit(share))


def equipoise(
    ps: np.ndarray, treated: np.ndarray, low: float = 0.3, high: float = 0.7
) -> float:
    """Share of all persons whose preference score lies in [low, high] (empirical equipoise)."""
    f = preference_score(ps, treated)
    return float(np.mean((f >= low) & (f <= high)))


def ps_strata(ps: np.ndarray, n_strata: int = 5) -> np.ndarray:
    """Quantile strata of ps over all persons, labelled 0..k-1 (k <= n_strata when ties merge).

    Intervals are right-closed like CohortMethod's stratifyByPs; tied cut points collapse.
    """
    ps = np.asarray(ps, dtype=np.float64)
    if ps.ndim != 1 or ps.size == 0:
        raise EstimationError("propensity scores must be a non-empty vector")
    check_ps(ps, ps.shape[0], open_interval=False)
    if n_strata < 1:
        raise EstimationError(f"n_strata must be at least 1, got {n_strata}")
    cuts = np.quantile(ps, np.arange(1, n_strata) / n_strata)
    labels = np.searchsorted(cuts, ps, side="left")
    _, dense = np.unique(labels, return_inverse=True)  # drop strata left empty by ties
    return dense.astype(np.int64)


def iptw_weights(
    ps: np.ndarray, treated: np.ndarray, *, estimand: Estimand = "ATE", stabilized: bool = True
) -> np.ndarray:
    """Inverse probability of treatment weights for the ATE, ATT or ATO (overlap weights).

    ATE: 1/ps, 1/(1-ps); ATT: 1, ps/(1-ps); ATO: 1-ps, ps. Stabilised ATE multiplies by the
    arm's share; stabilised ATT multiplies comparators by (1-P)/P; ATO weights are left as is.
    """
    t = as_treated(treated)
    ps = check_ps(ps, t.shape[0], open_interval=estimand != "ATO")
    tr = t == 1
    share = float(t.mean()) if t.size else math.nan
    if stabilized and estimand != "ATO" and not 0.0 < share < 1.0:
        raise EstimationError("stabilised weights need persons in both arms")
    if estimand == "ATE":
        w = np.where(tr, 1.0 / ps, 1.0 / (1.0 - ps))
        if stabilized:
            w *= np.where(tr, share, 1.0 - share)
    elif estimand == "ATT":
        w = np.where(tr, 1.0, ps / (1.0 - ps))
        if stabilized:
            w[~tr] *= (1.0 - share) / share
    elif estimand == "ATO":
        w = np.where(tr, 1.0 - ps, ps)
    else:
        raise EstimationError(f"unknown estimand {estimand!r} (ATE, ATT or ATO)")
    return w


def stratification_weights(strata: np.ndarray, treated: np.ndarray) -> np.ndarray:
    """Weights n_s / n_(s, arm): each arm of each stratum stands for the whole stratum (ATE).

    Balance after stratification is then a weighted SMD. Persons in a stratum lacking one arm
    get weight 0 (that stratum cannot contribute a comparison).
    """
    t = as_treated(treated)
    s = np.asarray(strata)
    if s.shape != t.shape:
        raise EstimationError("strata and treatment must have the same length")
    _, sid = np.unique(s, return_inverse=True)
    k = int(sid.max()) + 1 if sid.size else 0
    n_arm = np.zeros((k, 2))
    np.add.at(n_arm, (sid, t), 1.0)
    n_stratum = n_arm.sum(axis=1)
    both = (n_arm > 0).all(axis=1)
    per_cell = np.divide(
        n_stratum[:, None], n_arm, out=np.zeros_like(n_arm), where=both[:, None]
    )
    return per_cell[sid, t]


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: how many equal-weight persons."""
    w = np.asarray(weights, dtype=np.float64)
    if np.isnan(w).any() or (w < 0).any():
        raise EstimationError("weights must be non-negative and not NaN")
    ss = float(np.dot(w, w))
    return float(w.sum()) ** 2 / ss if ss > 0 else 0.0
