"""Estimator benchmark: `python -m bench.estimators [--persons N] [--covariates P] [--outcomes K]`.

On one synthetic comparison shaped like real OMOP covariates (sparse binary, ~12 non-zeros per
row, Zipf-like prevalences), measures in one run:
  - the cross-validated L1 propensity model;
  - our weighted Cox with robust SE vs lifelines' (the reference), side by side, same data;
  - the pipeline's per-comparison analysis (one PS fit, crude/IPTW/PS-strata Cox x K outcomes);
  - every library estimator on the same comparison for K outcomes (hazard ratios for the
    PS-based ones with the PS fitted once; risk differences at one year for the outcome-model
    ones, which fit their own nuisance models per outcome).
Prints a Markdown table. Timings are wall-clock seconds on this machine, warm.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp


def synthetic_comparison(n: int, p: int, k: int, seed: int = 0):
    """Sparse binary covariates, confounded treatment, k time-to-event outcomes (days)."""
    rng = np.random.default_rng(seed)
    prevalence = 0.3 / np.arange(1, p + 1) ** 0.6
    prevalence *= 12 / prevalence.sum()
    counts = rng.binomial(p, 12 / p, n).clip(1, None)
    rows = np.repeat(np.arange(n), counts)
    cols = rng.choice(p, size=rows.size, p=prevalence / prevalence.sum())
    X = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, p))
    X.data[:] = 1.0
    beta = np.zeros(p)
    beta[:50] = rng.normal(0, 0.5, 50)
    logit = np.asarray(X @ beta).ravel() - 0.2
    treated = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    follow = rng.integers(30, 2000, n).astype(float)
    outcomes = []
    for j in range(k):
        hr = (0.5, 1.0, 1.0, 2.0)[j % 4]
        rate = 2e-4 * np.exp(0.6 * logit) * np.where(treated == 1, hr, 1.0)
        t_event = np.ceil(rng.exponential(1 / rate))
        event = (t_event <= follow).astype(np.int8)
        outcomes.append((np.where(event == 1, t_event, follow), event))
    return X, treated, outcomes


def timed(label: str, fn: Callable, rows: list, repeat: int = 1) -> object:
    """Run fn, keep the best of `repeat` wall times, record the row, return the last result."""
    best, result = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    rows.append((label, best))
    print(f"  {label}: {best:.3f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--covariates", type=int, default=7_000)
    parser.add_argument("--outcomes", type=int, default=70)
    parser.add_argument("--skip-lifelines", action="store_true")
    args = parser.parse_args()

    from estimators import (
        AIPW,
        IPW,
        Crude,
        DoubleML,
        OverlapWeights,
        PSMatching,
        PSStratification,
        Standardization,
        TLearner,
    )
    from estimators.comparison import OutcomeInput, analyze_comparison
    from estimators.cox import fit_cox
    from estimators.propensity import fit_propensity, iptw_weights

    n, p, k = args.persons, args.covariates, args.outcomes
    print(f"# {n:,} persons x {p:,} sparse covariates, {k} outcomes", flush=True)
    X, t, outcomes = synthetic_comparison(n, p, k)
    print(f"  covariates: {X.nnz / n:.1f} non-zeros per row, {t.mean():.0%} treated")
    rows: list[tuple[str, float]] = []
    fit_propensity(X[:5000], t[:5000])  # warm-up (imports, first memory touch)
    fit = timed("PS: L1 logistic, 3-fold CV over the penalty path", lambda: fit_propensity(X, t),
                rows)
    ps = fit.ps
    weights = iptw_weights(ps, t)
    time0, event0 = outcomes[0]
    timed("weighted Cox + robust SE, ours (1 outcome)",
          lambda: fit_cox(time0, event0, t, weights=weights, ties="efron"), rows, repeat=5)
    if not args.skip_lifelines:
        import pandas as pd
        from lifelines import CoxPHFitter

        frame = pd.DataFrame({"T": time0, "E": event0, "t": t, "w": weights})
        reference = timed("weighted Cox + robust SE, lifelines (1 outcome)",
                          lambda: CoxPHFitter().fit(frame, "T", "E", weights_col="w",
                                                    robust=True), rows)
        ours = fit_cox(time0, event0, t, weights=weights, ties="efron")
        print(f"  log HR ours {ours.log_hr:.6f} vs lifelines {reference.params_['t']:.6f}")
    inputs = {f"o{j}": OutcomeInput(time_, event_, np.zeros(n, bool))
              for j, (time_, event_) in enumerate(outcomes)}
    timed(f"pipeline analysis: 1 PS fit + crude/IPTW/PS-strata Cox x {k} outcomes + balance",
          lambda: analyze_comparison(X, t, inputs), rows)
    hazard = {"Crude": Crude(), "IPW": IPW(), "OverlapWeights": OverlapWeights(),
              "PSMatching": PSMatching(), "PSStratification": PSStratification()}
    for name, estimator in hazard.items():
        given = {} if name == "Crude" else {"ps": ps}
        timed(f"{name} hazard ratio x {k} outcomes (PS given)",
              lambda e=estimator, g=given: [e.fit(X, t, time=a, event=b, **g)
                                            for a, b in outcomes], rows)
    one_year = [((a <= 365) & (b == 1)).astype(float) for a, b in outcomes]
    models = {"AIPW": AIPW(n_folds=2), "DoubleML": DoubleML(n_folds=2),
              "Standardization": Standardization(n_bootstrap=0),
              "TLearner": TLearner(n_bootstrap=0)}
    for name, estimator in models.items():
        timed(f"{name} one-year risk difference x {k} outcomes",
              lambda e=estimator: [e.fit(X, t, y) for y in one_year], rows)
    print("\n| step | seconds |\n|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} |")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")


if __name__ == "__main__":
    main()
