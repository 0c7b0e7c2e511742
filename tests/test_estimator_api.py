"""Every estimator class honours the same contract: inputs, results and bad-input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from estimators import (
    AIPW,
    IPW,
    Crude,
    DoubleML,
    EffectEstimate,
    EstimationError,
    OverlapWeights,
    PSMatching,
    PSStratification,
    Standardization,
    TLearner,
)

FAST_PS = LogisticRegression(C=1e6, max_iter=1000)
CLASSES = {
    "Crude": lambda: Crude(), "IPW": lambda: IPW(propensity_model=FAST_PS),
    "OverlapWeights": lambda: OverlapWeights(propensity_model=FAST_PS),
    "PSMatching": lambda: PSMatching(propensity_model=FAST_PS),
    "PSStratification": lambda: PSStratification(propensity_model=FAST_PS),
    "Standardization": lambda: Standardization(n_bootstrap=30),
    "TLearner": lambda: TLearner(n_bootstrap=30),
    "AIPW": lambda: AIPW(propensity_model=FAST_PS, n_folds=2),
    "DoubleML": lambda: DoubleML(treatment_model=FAST_PS, n_folds=2),
}


def data(n: int = 1500, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    X[:, 3] = 1.0                                            # a constant column
    t = (rng.random(n) < 1 / (1 + np.exp(-X[:, 0]))).astype(int)
    y = X[:, 0] + 0.5 * t + rng.normal(size=n)
    return X, t, y


@pytest.mark.parametrize("name", CLASSES)
def test_same_answer_for_array_dataframe_and_sparse(name):
    X, t, y = data()
    results = [CLASSES[name]().fit(M, t, y).effect()
               for M in (X, pd.DataFrame(X, columns=list("abcd")), sp.csr_matrix(X))]
    assert all(isinstance(r, EffectEstimate) for r in results)
    first = results[0]
    assert first.measure == "difference" and first.ci_low < first.estimate < first.ci_high
    if name == "PSMatching":     # counts of the matched sample
        assert 0 < first.n_treated <= t.sum() and 0 < first.n_control <= (1 - t).sum()
    else:
        assert (first.n_treated, first.n_control) == (t.sum(), (1 - t).sum())
    if name != "DoubleML":   # its default outcome model differs for sparse input (ridge)
        assert results[1].estimate == pytest.approx(first.estimate, rel=1e-6)
    adjusted = name != "Crude"
    assert abs(first.estimate - 0.5) < (0.25 if adjusted else 5)


@pytest.mark.parametrize("name", CLASSES)
def test_bad_inputs_raise_specific_errors(name):
    X, t, y = data()
    with pytest.raises(EstimationError, match="not fitted yet"):
        CLASSES[name]().effect()
    with pytest.raises(EstimationError, match="the treated arm is empty"):
        CLASSES[name]().fit(X, np.zeros_like(t), y)
    bad = X.copy()
    bad[5, 1] = np.nan
    with pytest.raises(EstimationError, match="NaN"):
        CLASSES[name]().fit(bad, t, y)
    with pytest.raises(EstimationError, match="length"):
        CLASSES[name]().fit(X, t, y[:-1])


@pytest.mark.parametrize("name", ["IPW", "OverlapWeights", "PSMatching", "PSStratification",
                                  "AIPW"])
def test_perfect_separation_is_refused(name):
    X, t, y = data()
    X[:, 2] = np.where(t == 1, 5.0, -5.0)                    # a covariate that is the treatment
    estimator = {"IPW": IPW(), "OverlapWeights": OverlapWeights(), "PSMatching": PSMatching(),
                 "PSStratification": PSStratification(), "AIPW": AIPW(n_folds=2)}[name]
    with pytest.raises(EstimationError, match=r"separat|overlap"):
        estimator.fit(X, t, y)


@pytest.mark.parametrize("name", ["Crude", "IPW", "OverlapWeights", "PSMatching",
                                  "PSStratification"])
def test_time_to_event_gives_hazard_ratios_and_no_events_is_an_error(name):
    X, t, _ = data()
    rng = np.random.default_rng(3)
    time = rng.integers(1, 1000, t.shape[0]).astype(float)
    event = (rng.random(t.shape[0]) < 0.2).astype(int)
    res = CLASSES[name]().fit(X, t, time=time, event=event).effect()
    assert res.measure == "hazard_ratio" and res.ci_low < res.estimate < res.ci_high
    with pytest.raises(EstimationError, match=r"no .*events"):
        CLASSES[name]().fit(X, t, time=time, event=np.zeros_like(event))
