"""Propensity-score matching (1:k nearest neighbour with a caliper) and its ATT estimator.

Without replacement the algorithm is CohortMethod's matchOnPs (src/Match.cpp, Rassen et al.
2012 variable ratio): in round r = 1..k every treated person with r - 1 matches gets one more
comparator, pairs taken greedily closest-first over the whole population (not in a random
order), a pair only when its distance is below the caliper. It is run vectorised: a pair that is
the closest for both its treated and its comparator is the one the sequential greedy would take,
so each pass takes all such mutual-nearest pairs at once (on the sorted scores, with
searchsorted), and passes repeat until nothing within the caliper is left; persons with equal
scores are handled as one block. Exact ties are broken by a seeded random order, so results are
deterministic given `seed`. With replacement each treated person takes its k nearest comparators
within the caliper (ties again by the seeded order).

Outcomes (ATT over matched treated persons): differences use the Abadie-Imbens (2006) variance
for the ATT, (1/N1^2)[sum_i (D_i - tau)^2 + sum_j (K_j^2 - K'_j) s_j^2], K_j the comparator's
use weighted by 1/m_i, K'_j the sum of 1/m_i^2, s_j^2 from its 2 nearest comparators. Without
replacement K_j^2 = K'_j, so it is the paired (matched-set) variance. It treats the propensity
score as known. Risk ratios apply the same formula to the linearised outcome. Hazard ratios:
Cox stratified on matched sets (model-based SE), as CohortMethod; with replacement reused
comparators are repeated in each of their sets, which ignores that correlation. Horizon risks:
KM per arm with comparators weighted K_j; variance clustered on matched sets without
replacement, per person with replacement (ignores the treated-comparator correlation that
matching induces, so it errs conservative). ``variance="bootstrap"`` resamples persons, refits
the PS (unless given) and re-matches (known to be unreliable for matching with replacement,
Abadie & Imbens 2008).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logit

from estimators.base import CausalEstimator, FitData, propensity_scores
from estimators.cox import fit_cox
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.propensity import as_treated, check_ps
from estimators.weighting import (
    Contrast,
    bootstrap,
    check_measure,
    contrast,
    influence_variance,
    km_arm_risks,
    make_effect,
)

AI_NEIGHBOURS = 2
"""Same-arm neighbours used for the Abadie-Imbens conditional variance of reused comparators."""


@dataclass(frozen=True, eq=False)
class Matches:
    """Matched pairs (row indices); one matched set per matched treated person."""

    treated: np.ndarray
    control: np.ndarray
    set_id: np.ndarray
    """Matched set of each pair, 0..n_sets-1 (ordered by the treated person's row)."""
    caliper: float
    """Absolute caliper on the matching scale (inf = none)."""
    n: int

    @property
    def n_sets(self) -> int:
        return int(self.set_id.max()) + 1 if self.set_id.size else 0

    @property
    def set_size(self) -> np.ndarray:
        """Comparators per matched set."""
        return np.bincount(self.set_id, minlength=self.n_sets)

    def weights(self) -> np.ndarray:
        """Per person: 1 for matched treated, K_j = sum over uses of 1/set size for comparators.

        Each arm's weights sum to the number of matched sets (the ATT weighting of the match).
        """
        w = np.bincount(self.control, 1.0 / self.set_size[self.set_id], minlength=self.n)
        w[self.treated] = 1.0
        return w


def matching_scores(
    ps: np.ndarray, caliper: float | None, caliper_scale: str
) -> tuple[np.ndarray, float]:
    """Scores to match on and the absolute caliper (CohortMethod's 'standardized logit' or ps)."""
    if caliper_scale == "logit_sd":
        score = logit(ps)
        sd = float(score.std(ddof=1)) if score.size > 1 else 0.0
        width = caliper * sd if caliper is not None and caliper > 0 and sd > 0 else math.inf
    elif caliper_scale == "ps":
        score = ps
        width = caliper if caliper is not None and caliper > 0 else math.inf
    else:
        raise EstimationError(f"caliper_scale must be 'logit_sd' or 'ps', not {caliper_scale!r}")
    return score, width


def match_on_ps(
    ps: Any, treated: Any, *, k: int = 1, caliper: float | None = 0.2,
    caliper_scale: str = "logit_sd", replace: bool = False, seed: int = 0,
) -> Matches:
    """Match each treated person to up to k comparators on the PS within the caliper.

    Pairs are at distance strictly below the caliper (as CohortMethod). Raises EstimationError
    when nothing can be matched.
    """
    t = as_treated(np.asarray(treated))
    ps = check_ps(ps, t.shape[0], open_interval=caliper_scale == "logit_sd")
    if k < 1:
        raise EstimationError(f"k must be at least 1, got {k}")
    if t.sum() == 0 or t.sum() == t.size:
        raise EstimationError("matching needs persons in both arms")
    score, width = matching_scores(ps, caliper, caliper_scale)
    rank = np.random.default_rng(seed).permutation(t.size)
    if replace:
        pt, pc = _nearest_with_replacement(score, t, rank, k, width)
    else:
        pt, pc = _greedy(score, t, rank, k, width)
    if pt.size == 0:
        raise EstimationError("no treated person has a comparator within the caliper")
    order = np.lexsort((rank[pc], pt))
    pt, pc = pt[order], pc[order]
    _, set_id = np.unique(pt, return_inverse=True)
    return Matches(treated=pt, control=pc, set_id=set_id, caliper=width, n=int(t.size))


def _nearest_with_replacement(
    score: np.ndarray, t: np.ndarray, rank: np.ndarray, k: int, width: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each treated person's k nearest comparators (sorted by score, then seeded rank)."""
    comp = np.flatnonzero(t == 0)
    comp = comp[np.lexsort((rank[comp], score[comp]))]
    cs = score[comp]
    tr = np.flatnonzero(t == 1)
    p = np.searchsorted(cs, score[tr])
    cand = p[:, None] + np.arange(-k, k)[None, :]
    valid = (cand >= 0) & (cand < cs.size)
    cand = np.clip(cand, 0, cs.size - 1)
    dist = np.where(valid, np.abs(cs[cand] - score[tr][:, None]), np.inf)
    pick = np.argsort(dist, axis=1, kind="stable")[:, :k]
    rows = np.arange(tr.size)[:, None]
    ok = dist[rows, pick] < width
    return np.broadcast_to(tr[:, None], pick.shape)[ok], comp[cand[rows, pick][ok]]


def _nearest_block(
    u_from: np.ndarray, u_to: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each value in u_from, index into u_to of the nearest value (ties: lower), distance."""
    p = np.searchsorted(u_to, u_from)
    left = np.maximum(p - 1, 0)
    right = np.minimum(p, u_to.size - 1)
    dl = np.where(p > 0, u_from - u_to[left], np.inf)
    dr = np.where(p < u_to.size, u_to[right] - u_from, np.inf)
    take_left = dl <= dr
    return np.where(take_left, left, right), np.where(take_left, dl, dr)


def _greedy(
    score: np.ndarray, t: np.ndarray, rank: np.ndarray, k: int, width: float
) -> tuple[np.ndarray, np.ndarray]:
    """CohortMethod's closest-first greedy matching without replacement, in vectorised passes.

    Persons with equal scores form a block; within a block, persons are used in rank order.
    Block pairs are ordered by (distance, treated block, comparator block): a block pair that is
    nearest for both blocks is the next the sequential greedy takes, so all of them go at once.
    """
    uniq, block = np.unique(score, return_inverse=True)
    nb = uniq.size
    order = np.lexsort((rank, t, block))  # by block, comparators first, then rank
    nc = np.bincount(block, t == 0, minlength=nb).astype(np.int64)
    nt = np.bincount(block, t == 1, minlength=nb).astype(np.int64)
    cstart = np.cumsum(nc + nt) - (nc + nt)
    tstart = cstart + nc
    cused = np.zeros(nb, dtype=np.int64)
    eligible = nt.copy()
    cb = np.flatnonzero(nc > 0)  # comparator blocks with free comparators (compacted per pass)
    ucb = uniq[cb]
    pairs_t, pairs_c = [], []
    for _ in range(k):
        tptr = np.zeros(nb, dtype=np.int64)
        matched = np.zeros(nb, dtype=np.int64)
        tb = np.flatnonzero(eligible > 0)
        while tb.size and cb.size:
            utb = uniq[tb]
            near_c, dist = _nearest_block(utb, ucb)
            within = dist < width
            eligible[tb[~within]] = 0  # nothing free within the caliper: done for this round
            # nearest treated block, needed only for comparator blocks some treated block wants
            wanted = np.unique(near_c[within])
            if wanted.size == 0:
                break
            near_t, _ = _nearest_block(ucb[wanted], utb)
            back = near_t[np.minimum(np.searchsorted(wanted, near_c), wanted.size - 1)]
            mutual = within & (back == np.arange(tb.size))
            if not mutual.any():
                raise RuntimeError("matching made no progress (unexpected)")
            bt, pos = tb[mutual], near_c[mutual]
            bc = cb[pos]
            m = np.minimum(eligible[bt], nc[bc] - cused[bc])
            step = np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m)
            pairs_t.append(order[np.repeat(tstart[bt] + tptr[bt], m) + step])
            pairs_c.append(order[np.repeat(cstart[bc] + cused[bc], m) + step])
            tptr[bt] += m
            eligible[bt] -= m
            matched[bt] += m
            cused[bc] += m
            tb = tb[eligible[tb] > 0]
            gone = pos[cused[bc] == nc[bc]]
            if gone.size:
                cb, ucb = np.delete(cb, gone), np.delete(ucb, gone)
        eligible = matched
        if not eligible.any():
            break
    if not pairs_t:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(pairs_t), np.concatenate(pairs_c)


def _neighbour_variance(score: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Abadie-Imbens s^2 of y at `rows`: J/(J+1) (y - mean of the J nearest others in `rows`)^2."""
    order = rows[np.argsort(score[rows], kind="stable")]
    s, v = score[order], y[order]
    n = order.size
    J = min(AI_NEIGHBOURS, n - 1)
    if J < 1:
        return np.zeros(rows.size)
    offsets = np.r_[np.arange(-J, 0), np.arange(1, J + 1)]
    cand = np.arange(n)[:, None] + offsets[None, :]
    valid = (cand >= 0) & (cand < n)
    cand = np.clip(cand, 0, n - 1)
    dist = np.where(valid, np.abs(s[cand] - s[:, None]), np.inf)
    pick = np.take_along_axis(cand, np.argsort(dist, axis=1, kind="stable")[:, :J], axis=1)
    s2 = J / (J + 1) * (v - v[pick].mean(axis=1)) ** 2
    out = np.empty(y.shape[0])
    out[order] = s2
    return out[rows]


class PSMatching(CausalEstimator):
    """1:k nearest-neighbour propensity-score matching for the ATT (see the module notes)."""

    def __init__(
        self, propensity_model: Any = None, k: int = 1, caliper: float | None = 0.2,
        caliper_scale: str = "logit_sd", replace: bool = False,
        variance: str = "abadie_imbens", n_bootstrap: int = 200, horizon: float | None = None,
        seed: int = 0, measure: Contrast = "difference",
    ) -> None:
        self.propensity_model = propensity_model
        self.k = k
        self.caliper = caliper
        self.caliper_scale = caliper_scale
        self.replace = replace
        self.variance = variance
        self.n_bootstrap = n_bootstrap
        self.horizon = horizon
        self.seed = seed
        self.measure = measure

    def match(self, ps: np.ndarray, t: np.ndarray) -> Matches:
        """The matches this estimator uses for the given scores."""
        return match_on_ps(ps, t, k=self.k, caliper=self.caliper,
                           caliper_scale=self.caliper_scale, replace=self.replace,
                           seed=self.seed)

    def _fit(self, data: FitData, ps: Any = None) -> EffectEstimate:
        check_measure(self.measure, data, self.horizon)
        if self.variance not in ("abadie_imbens", "bootstrap"):
            raise EstimationError(f"variance must be 'abadie_imbens' or 'bootstrap', not "
                                  f"{self.variance!r}")
        scores = propensity_scores(data, self.propensity_model, ps, seed=self.seed)
        matches = self.match(scores, data.t)
        self.matches_ = matches
        counts = {"n_treated": matches.n_sets,
                  "n_control": int(np.unique(matches.control).size)}
        hr = data.kind == "survival" and self.horizon is None
        if self.variance == "bootstrap":
            value = self._estimate(data, scores, matches)[0]
            reps = bootstrap(data, self._point, ps=None if ps is None else scores,
                             propensity_model=self.propensity_model,
                             n_bootstrap=self.n_bootstrap, seed=self.seed)
            self.variance_method_ = f"bootstrap ({reps.size} replicates, re-matched)"
            se = float(reps.std(ddof=1))
        else:
            value, se = self._estimate(data, scores, matches)
        if hr:
            return EffectEstimate.from_log_ratio(value, se, measure="hazard_ratio",
                                                 estimand="ATT", **counts)
        return make_effect(value, se, measure=self.measure, estimand="ATT", **counts)

    def _point(self, data: FitData, ps: np.ndarray) -> float:
        return self._estimate(data, ps, self.match(ps, data.t))[0]

    def _estimate(self, data: FitData, ps: np.ndarray, matches: Matches) -> tuple[float, float]:
        """Estimate (log scale for ratios) and its analytic standard error."""
        if data.kind == "survival" and self.horizon is None:
            rows = np.r_[matches.treated[np.unique(matches.set_id, return_index=True)[1]],
                         matches.control]
            strata = np.r_[np.arange(matches.n_sets), matches.set_id]
            fit = fit_cox(data.time[rows], data.event[rows], data.t[rows], strata=strata)
            self.variance_method_ = "Cox stratified on matched sets, model-based SE"
            return fit.log_hr, fit.se
        if data.kind == "survival":
            return self._horizon(data, matches)
        return self._abadie_imbens(data, ps, matches)

    def _horizon(self, data: FitData, matches: Matches) -> tuple[float, float]:
        w = matches.weights()
        arms = km_arm_risks(data.time, data.event, data.t, w, self.horizon)
        value, infl = contrast(*arms, self.measure)
        clusters = None
        if not self.replace:
            clusters = np.zeros(data.n, dtype=np.int64)
            clusters[matches.control] = matches.set_id
            clusters[matches.treated] = matches.set_id
        self.variance_method_ = "KM influence values, " + (
            "clustered on matched sets" if clusters is not None else "per person")
        return value, math.sqrt(influence_variance(infl, clusters))

    def _abadie_imbens(
        self, data: FitData, ps: np.ndarray, matches: Matches
    ) -> tuple[float, float]:
        y = data.y
        inv_m = 1.0 / matches.set_size
        first = np.unique(matches.set_id, return_index=True)[1]
        y1 = y[matches.treated[first]]
        y0 = np.bincount(matches.set_id, y[matches.control] * inv_m[matches.set_id])
        n1 = matches.n_sets
        mu1, mu0 = float(y1.mean()), float(y0.mean())
        if self.measure == "ratio":
            value, _ = contrast(mu1, mu0, np.zeros(1), np.zeros(1), "ratio")
            z1, z0, scale0 = y1 / mu1, y0 / mu0, 1.0 / mu0
        else:
            value, z1, z0, scale0 = mu1 - mu0, y1, y0, 1.0
        diff = z1 - z0
        total = float(np.sum((diff - diff.mean()) ** 2))
        if self.replace:
            K = np.bincount(matches.control, inv_m[matches.set_id], minlength=data.n)
            K2 = np.bincount(matches.control, inv_m[matches.set_id] ** 2, minlength=data.n)
            reused = np.flatnonzero(K**2 - K2 > 1e-12)
            if reused.size:
                score, _ = matching_scores(ps, None, self.caliper_scale)
                s2 = _neighbour_variance(score, y, np.flatnonzero(data.t == 0))
                comp = np.flatnonzero(data.t == 0)
                s2_full = np.zeros(data.n)
                s2_full[comp] = s2
                total += float(np.sum((K**2 - K2)[reused] * s2_full[reused])) * scale0**2
        self.variance_method_ = "Abadie-Imbens (PS treated as known)"
        return value, math.sqrt(total) / n1
