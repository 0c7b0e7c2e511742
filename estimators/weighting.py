"""Crude and inverse-probability-weighted estimators (IPW, overlap weights), and the helpers the
matching and stratification estimators share: arm contrasts, influence values, the bootstrap.

Outcomes: y (continuous or binary) -> difference of (weighted) means, or for binary y with
``measure="ratio"`` the risk ratio; (time, event) -> Cox hazard ratio, or with ``horizon=H`` the
risk difference / ratio at H from (weighted) Kaplan-Meier curves per arm.

IPW variance ("sandwich"): every estimate here is a smooth function of the weights, so its
influence value per person is IF_i = w_i d(estimate)/dw_i (for a weighted mean that is
w_i (y_i - mu) / sum w: sum IF^2 is the HC0 sandwich of the weighted regression). When the
propensity score comes from a logistic model we fitted (the default L1 model or a scikit-learn
LogisticRegression), IF_i gains the stacked-estimating-equation term of Lunceford & Davidian
(2004): g' H^-1 psi_i, with psi_i the logistic score, H its information (plus any L2 penalty) and
g = sum_j IF_j dlog(w_j)/d(eta_j) x_j. L1 models are corrected on their active set (non-zero
coefficients) with the selection treated as fixed; the trimming set and truncated weights are
held fixed too. Not corrected (weights treated as known): a given ``ps=``, any other classifier,
logistic models with class weights, and hazard ratios (Lin-Wei robust Cox SE). Treating
estimated ATE weights as known is conservative; for ATT/ATO it can be either way.
``variance="bootstrap"`` resamples persons, refits the propensity model (unless ``ps=`` was
given) and recomputes the estimate; its SE gives a Wald interval on the estimate's scale (log
scale for ratios).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy import stats
from sklearn.linear_model import LogisticRegression

from estimators.base import CausalEstimator, FitData, fit_propensity_model, propensity_scores
from estimators.cox import fit_cox
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.propensity import iptw_weights
from estimators.survival import km_influence, risk_at, weighted_km

Contrast = Literal["difference", "ratio"]

MAX_CORRECTION_COLUMNS = 3000
"""Above this many active propensity-model columns the score correction is skipped (dense solve)."""

MIN_BOOTSTRAP_SUCCESS = 0.5
"""Share of bootstrap replicates that must yield an estimate; otherwise EstimationError."""

_Z = float(stats.norm.ppf(0.975))


# --------------------------------------------------------------------------------------------
# Shared helpers: effects from estimates, arm contrasts, influence values
# --------------------------------------------------------------------------------------------


def make_effect(
    value: float, se: float, *, measure: Contrast, estimand: str, n_treated: int, n_control: int
) -> EffectEstimate:
    """EffectEstimate with a Wald 95% CI; for ratios `value` is the log ratio."""
    if not (math.isfinite(value) and math.isfinite(se)):
        raise EstimationError("the estimate or its standard error is not finite")
    if measure == "ratio":
        return EffectEstimate.from_log_ratio(
            value, se, measure="ratio", estimand=estimand, n_treated=n_treated,
            n_control=n_control,
        )
    return EffectEstimate.from_difference(value, se, estimand=estimand, n_treated=n_treated,
                                          n_control=n_control)


def contrast(
    mu1: float, mu0: float, if1: np.ndarray, if0: np.ndarray, measure: Contrast
) -> tuple[float, np.ndarray]:
    """Difference mu1 - mu0 or log(mu1 / mu0), with its per-person influence values."""
    if measure == "difference":
        return mu1 - mu0, if1 - if0
    if mu1 <= 0 or mu0 <= 0:
        arm = "treated" if mu1 <= 0 else "comparator"
        raise EstimationError(f"no outcomes among the {arm}: the risk ratio is not estimable")
    return math.log(mu1 / mu0), if1 / mu1 - if0 / mu0


def influence_variance(influence: np.ndarray, clusters: np.ndarray | None = None) -> float:
    """Sum of squared influence values, summed within clusters first when given."""
    if clusters is not None:
        influence = np.bincount(clusters, influence)
    return float(np.dot(influence, influence))


def weighted_arm_means(
    y: np.ndarray, t: np.ndarray, w: np.ndarray
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Weighted mean of y per arm (Hajek) and influence values w_i (y_i - mu_arm) / W_arm."""
    out = []
    for arm in (1, 0):
        m = t == arm
        total = float(w[m].sum())
        if total <= 0:
            name = "treated" if arm else "comparator"
            raise EstimationError(f"the {name} arm has no persons with positive weight")
        mu = float(np.dot(w[m], y[m]) / total)
        out.append((mu, np.where(m, w * (y - mu) / total, 0.0)))
    (mu1, if1), (mu0, if0) = out
    return mu1, mu0, if1, if0


def km_arm_risks(
    time: np.ndarray, event: np.ndarray, t: np.ndarray, w: np.ndarray | None, horizon: float
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Kaplan-Meier risk at the horizon per arm and per-person influence values (0 off-arm)."""
    risks, ifs = [], []
    for arm in (1, 0):
        m = t == arm
        wa = None if w is None else w[m]
        curve = weighted_km(time[m], event[m], wa)
        risks.append(risk_at(curve, horizon)[0])
        full = np.zeros(t.shape[0])
        full[m] = km_influence(curve, time[m], event[m], wa, horizon)
        ifs.append(full)
    if risks[0] == 0 and risks[1] == 0:
        raise EstimationError(f"no events up to the horizon {horizon:g} in either arm")
    return risks[0], risks[1], ifs[0], ifs[1]


def check_measure(measure: str, data: FitData, horizon: float | None) -> None:
    """Reject a measure or horizon the outcome kind cannot support."""
    if measure not in ("difference", "ratio"):
        raise EstimationError(f"measure must be 'difference' or 'ratio', not {measure!r}")
    if horizon is not None and data.kind != "survival":
        raise EstimationError("horizon applies to time-to-event outcomes (time, event) only")
    if measure == "ratio" and data.kind == "continuous":
        raise EstimationError("a ratio needs a binary outcome or a time-to-event horizon")


def subset(data: FitData, rows: np.ndarray, *, covariates: bool = True) -> FitData:
    """The same data restricted to (or resampled at) `rows`; covariates=False drops X's columns."""
    X = data.X[rows] if covariates else sp.csr_matrix((rows.shape[0], 0))
    return FitData(
        X, data.t[rows], data.kind,
        y=None if data.y is None else data.y[rows],
        time=None if data.time is None else data.time[rows],
        event=None if data.event is None else data.event[rows],
    )


def bootstrap(
    data: FitData, statistic: Callable[[FitData, np.ndarray], float], *,
    ps: np.ndarray | None, propensity_model: Any, n_bootstrap: int, seed: int,
) -> np.ndarray:
    """Statistic on `n_bootstrap` resamples of persons; the PS is refitted unless `ps` is given.

    Replicates that cannot be estimated (e.g. an empty arm) are skipped; if more than half fail
    the bootstrap raises EstimationError.
    """
    if n_bootstrap < 2:
        raise EstimationError(f"n_bootstrap must be at least 2, got {n_bootstrap}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_bootstrap):
        rows = rng.integers(0, data.n, data.n)
        part = subset(data, rows, covariates=ps is None)
        if part.n_treated == 0 or part.n_control == 0:
            continue
        try:
            ps_b = ps[rows] if ps is not None else propensity_scores(
                part, propensity_model, seed=seed)
            values.append(statistic(part, ps_b))
        except EstimationError:
            continue
    if len(values) < max(2, MIN_BOOTSTRAP_SUCCESS * n_bootstrap):
        raise EstimationError(
            f"only {len(values)} of {n_bootstrap} bootstrap replicates could be estimated"
        )
    return np.asarray(values)


# --------------------------------------------------------------------------------------------
# The propensity model, kept for the score correction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PSModel:
    """Propensity scores plus, for logistic models we fitted, what the correction needs."""

    ps: np.ndarray
    design: sp.csr_matrix | np.ndarray | None = None
    """[1, X_active]: columns of the fitted logistic model; None = no correction possible."""
    penalty: np.ndarray | None = None
    """Diagonal L2-penalty Hessian per design column (on the summed log-likelihood scale)."""
    note: str = "weights treated as known"


def _design(X, active: np.ndarray, intercept: bool) -> sp.csr_matrix | np.ndarray:
    cols = X[:, active]
    if not intercept:
        return cols
    ones = np.ones((X.shape[0], 1))
    if sp.issparse(cols):
        return sp.hstack([sp.csr_matrix(ones), cols], format="csr")
    return np.hstack([ones, cols])


def fit_ps_model(data: FitData, propensity_model: Any, ps: Any, seed: int) -> PSModel:
    """Fit (or take) the propensity score, keeping the logistic design when it can be used."""
    fitted = fit_propensity_model(data, propensity_model, ps, seed=seed)
    if ps is not None:
        return PSModel(fitted.ps, note="given ps treated as known")
    if fitted.default_fit is not None:
        active = np.flatnonzero(fitted.default_fit.coef)
        if active.size + 1 > MAX_CORRECTION_COLUMNS:
            return PSModel(fitted.ps, note="weights treated as known (too many active columns)")
        design = _design(data.X, active, intercept=True)
        return PSModel(fitted.ps, design, np.zeros(active.size + 1),
                       note="corrected for the estimated L1 logistic PS (active set)")
    model = fitted.model
    if not isinstance(model, LogisticRegression) or model.class_weight is not None:
        return PSModel(fitted.ps, note="weights treated as known (non-logistic PS model)")
    return _logistic_model(model, data, fitted.ps)


def _logistic_model(model: LogisticRegression, data: FitData, scores: np.ndarray) -> PSModel:
    """Design and penalty of a fitted scikit-learn LogisticRegression (C = loss multiplier)."""
    penalty = getattr(model, "penalty", "deprecated")
    C = float(model.C)
    if penalty is None:
        C = math.inf
    l1 = {"l1": 1.0, "l2": 0.0}.get(penalty, model.l1_ratio or 0.0)
    coef = model.coef_[0]
    active = np.flatnonzero(coef) if l1 > 0 else np.arange(coef.size)
    k = active.size + bool(model.fit_intercept)
    if k > MAX_CORRECTION_COLUMNS:
        return PSModel(scores, note="weights treated as known (too many active columns)")
    ridge = (1.0 - l1) / C if math.isfinite(C) else 0.0
    pen = np.full(k, ridge)
    if model.fit_intercept:
        pen[0] = ridge / model.intercept_scaling**2 if model.solver == "liblinear" else 0.0
    design = _design(data.X, active, intercept=bool(model.fit_intercept))
    return PSModel(scores, design, pen, note="corrected for the estimated logistic PS")


def ps_correction(
    influence: np.ndarray, dlogw: np.ndarray, t: np.ndarray, model: PSModel
) -> np.ndarray:
    """Influence values plus the Lunceford-Davidian term for the estimated logistic PS.

    `dlogw` is d log(w_i) / d eta_i (eta the PS linear predictor); psi_i = x_i (t_i - e_i) is
    centred so that it solves the (penalised) score equations exactly.
    """
    if model.design is None:
        return influence
    D, e = model.design, model.ps
    v = e * (1.0 - e)
    if sp.issparse(D):
        H = (D.T @ D.multiply(v[:, None]).tocsr()).toarray()
    else:
        H = D.T @ (D * v[:, None])
    H[np.diag_indices_from(H)] += model.penalty
    g = np.asarray(D.T @ (influence * dlogw)).ravel()
    try:
        a = scipy.linalg.solve(H, g, assume_a="pos")
    except (np.linalg.LinAlgError, ValueError):
        a = np.linalg.pinv(H) @ g
    term = np.asarray(D @ a).ravel() * (t - e)
    return influence + term - term.mean()


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------


class Crude(CausalEstimator):
    """Unadjusted comparison: difference of means (Welch SE), risk ratio, Cox HR or KM risks.

    A given ``ps=`` is accepted and ignored. Horizon risks carry Greenwood variances.
    """

    def __init__(self, horizon: float | None = None, measure: Contrast = "difference") -> None:
        self.horizon = horizon
        self.measure = measure

    def _fit(self, data: FitData, **kwargs: Any) -> EffectEstimate:
        check_measure(self.measure, data, self.horizon)
        counts = {"n_treated": data.n_treated, "n_control": data.n_control}
        t = data.t
        if data.kind == "survival" and self.horizon is None:
            fit = fit_cox(data.time, data.event, t)
            return fit.effect(estimand="unadjusted", **counts)
        if data.kind == "survival":
            mu1, mu0, if1, if0 = km_arm_risks(data.time, data.event, t, None, self.horizon)
            value, infl = contrast(mu1, mu0, if1, if0, self.measure)
            se = math.sqrt(influence_variance(infl))
        else:
            value, se = welch(data.y, t, self.measure)
        return make_effect(value, se, measure=self.measure, estimand="unadjusted", **counts)


def welch(y: np.ndarray, t: np.ndarray, measure: Contrast) -> tuple[float, float]:
    """Difference (or log ratio) of arm means with unpooled sample variances (ddof=1)."""
    parts = []
    for arm in (1, 0):
        ya = y[t == arm]
        var = float(ya.var(ddof=1)) if ya.size > 1 else 0.0
        parts.append((float(ya.mean()), var / ya.size))
    (mu1, v1), (mu0, v0) = parts
    if measure == "difference":
        return mu1 - mu0, math.sqrt(v1 + v0)
    value, _ = contrast(mu1, mu0, np.zeros(1), np.zeros(1), "ratio")
    return value, math.sqrt(v1 / mu1**2 + v0 / mu0**2)


def _dlogw(ps: np.ndarray, t: np.ndarray, estimand: str) -> np.ndarray:
    """d log(w) / d logit(ps) for the ATE, ATT and ATO weights."""
    tr = t == 1
    if estimand == "ATE":
        return np.where(tr, -(1.0 - ps), ps)
    if estimand == "ATT":
        return np.where(tr, 0.0, 1.0)
    return np.where(tr, -ps, 1.0 - ps)


class IPW(CausalEstimator):
    """Inverse probability of treatment weighting for the ATE or ATT (see the module notes).

    ``trim=(lo, hi)`` drops persons with ps outside [lo, hi]; ``truncate=q`` caps weights at
    their q-quantile. Hazard ratios come from a weighted Cox model with a robust SE.
    """

    def __init__(
        self, propensity_model: Any = None, estimand: str = "ATE", stabilized: bool = True,
        trim: tuple[float, float] | None = None, truncate: float | None = None,
        variance: str = "sandwich", n_bootstrap: int = 200, horizon: float | None = None,
        seed: int = 0, measure: Contrast = "difference",
    ) -> None:
        self.propensity_model = propensity_model
        self.estimand = estimand
        self.stabilized = stabilized
        self.trim = trim
        self.truncate = truncate
        self.variance = variance
        self.n_bootstrap = n_bootstrap
        self.horizon = horizon
        self.seed = seed
        self.measure = measure

    def _check(self, data: FitData) -> None:
        check_measure(self.measure, data, self.horizon)
        if self.estimand not in ("ATE", "ATT", "ATO"):
            raise EstimationError(f"estimand must be ATE, ATT or ATO, not {self.estimand!r}")
        if self.variance not in ("sandwich", "bootstrap"):
            raise EstimationError(f"variance must be 'sandwich' or 'bootstrap', not "
                                  f"{self.variance!r}")
        if self.trim is not None and not 0 <= self.trim[0] < self.trim[1] <= 1:
            raise EstimationError(f"trim must be (lo, hi) with 0 <= lo < hi <= 1, got {self.trim}")
        if self.truncate is not None and not 0 < self.truncate <= 1:
            raise EstimationError(f"truncate must be a quantile in (0, 1], got {self.truncate}")

    def _weights(self, ps: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights (0 for trimmed persons) and d log w / d eta (0 where constant)."""
        keep = np.ones(t.shape[0], dtype=bool)
        if self.trim is not None:
            keep = (ps >= self.trim[0]) & (ps <= self.trim[1])
            for arm, name in ((1, "treated"), (0, "comparator")):
                if not (keep & (t == arm)).any():
                    raise EstimationError(f"trimming at {self.trim} leaves no {name} persons")
        w = np.zeros(t.shape[0])
        w[keep] = iptw_weights(ps[keep], t[keep], estimand=self.estimand,
                               stabilized=self.stabilized)
        dlogw = np.where(keep, _dlogw(ps, t, self.estimand), 0.0)
        if self.truncate is not None:
            cap = float(np.quantile(w[keep], self.truncate))
            capped = w > cap
            w[capped] = cap
            dlogw[capped] = 0.0
        return w, dlogw

    def _point(self, data: FitData, ps: np.ndarray) -> float:
        """The estimate (log scale for ratios) without its variance, for the bootstrap."""
        w, _ = self._weights(ps, data.t)
        if data.kind == "survival" and self.horizon is None:
            return fit_cox(data.time, data.event, data.t, weights=w, robust=False).log_hr
        if data.kind == "survival":
            arms = km_arm_risks(data.time, data.event, data.t, w, self.horizon)
        else:
            arms = weighted_arm_means(data.y, data.t, w)
        return contrast(*arms, self.measure)[0]

    def _fit(self, data: FitData, ps: Any = None) -> EffectEstimate:
        self._check(data)
        model = fit_ps_model(data, self.propensity_model, ps, self.seed)
        t = data.t
        w, dlogw = self._weights(model.ps, t)
        kept = w > 0
        counts = {"n_treated": int((kept & (t == 1)).sum()),
                  "n_control": int((kept & (t == 0)).sum())}
        survival_hr = data.kind == "survival" and self.horizon is None
        measure: Contrast = "ratio" if survival_hr else self.measure
        if self.variance == "bootstrap":
            value = self._point(data, model.ps)
            reps = bootstrap(data, self._point, ps=None if ps is None else model.ps,
                             propensity_model=self.propensity_model,
                             n_bootstrap=self.n_bootstrap, seed=self.seed)
            self.variance_method_ = f"bootstrap ({reps.size} replicates, PS " + (
                "given)" if ps is not None else "refitted)")
            se = float(reps.std(ddof=1))
            if survival_hr:
                return EffectEstimate.from_log_ratio(value, se, measure="hazard_ratio",
                                                     estimand=self.estimand, **counts)
            return make_effect(value, se, measure=measure, estimand=self.estimand, **counts)
        if survival_hr:
            fit = fit_cox(data.time, data.event, t, weights=w, robust=True)
            self.variance_method_ = "robust Cox (Lin-Wei), weights treated as known"
            return fit.effect(estimand=self.estimand, **counts)
        if data.kind == "survival":
            arms = km_arm_risks(data.time, data.event, t, w, self.horizon)
        else:
            arms = weighted_arm_means(data.y, t, w)
        value, infl = contrast(*arms, self.measure)
        infl = ps_correction(infl, dlogw, t, model)
        self.variance_method_ = f"sandwich, {model.note}"
        se = math.sqrt(influence_variance(infl))
        return make_effect(value, se, measure=self.measure, estimand=self.estimand, **counts)


class OverlapWeights(IPW):
    """Overlap (ATO) weights: treated 1 - ps, comparators ps; otherwise as IPW."""

    def __init__(
        self, propensity_model: Any = None, horizon: float | None = None, seed: int = 0,
        measure: Contrast = "difference",
    ) -> None:
        super().__init__(propensity_model, estimand="ATO", stabilized=False, horizon=horizon,
                         seed=seed, measure=measure)
