"""Tree-based heterogeneous effects: a causal forest through econml (an optional extra).

`CausalForest` wraps econml's CausalForestDML (generalised random forest on residualised
outcome and treatment, Athey, Tibshirani & Wager 2019) in this library's interface: `effect()`
is the average effect with econml's inference, `predict_ite(X)` the per-person effects.
Install with `pip install 'cohortflow[cate]'` (pinned in requirements.lock).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from estimators.base import CausalEstimator, FitData
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError


def _econml() -> Any:
    try:
        from econml.dml import CausalForestDML
    except ImportError:
        raise EstimationError(
            "CausalForest needs the optional extra econml: pip install 'cohortflow[cate]'"
        ) from None
    return CausalForestDML


class CausalForest(CausalEstimator):
    """Causal forest (econml CausalForestDML) for continuous or binary y; difference scale."""

    def __init__(self, n_estimators: int = 200, min_samples_leaf: int = 5, cv: int = 2,
                 seed: int = 0) -> None:
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.cv = cv
        self.seed = seed

    def _fit(self, data: FitData) -> EffectEstimate:
        if data.kind == "survival":
            raise EstimationError("CausalForest takes y (continuous or binary), not time to event")
        forest_class = _econml()
        X = data.X.toarray() if hasattr(data.X, "toarray") else data.X
        self.forest_ = forest_class(
            # econml's default treatment model relies on scikit-learn defaults deprecated in 1.8
            model_t=LogisticRegression(l1_ratio=0.0, C=1.0, max_iter=2000),
            discrete_treatment=True, n_estimators=self.n_estimators, cv=self.cv,
            min_samples_leaf=self.min_samples_leaf, random_state=self.seed,
        ).fit(data.y, data.t, X=X)
        inference = self.forest_.ate_inference(X=X)
        low, high = (float(v) for v in np.ravel(inference.conf_int_mean(alpha=0.05)))
        return EffectEstimate.from_difference(
            float(np.ravel(inference.mean_point)[0]), float(np.ravel(inference.stderr_mean)[0]),
            estimand="ATE", n_treated=data.n_treated, n_control=data.n_control,
            ci=(low, high),
        )

    def predict_ite(self, X: Any) -> np.ndarray:
        """Per-person effect estimates (CATE) for the rows of X."""
        if not hasattr(self, "forest_"):
            raise EstimationError("CausalForest is not fitted yet: call fit() first")
        X = X.toarray() if hasattr(X, "toarray") else np.asarray(X, dtype=float)
        return np.ravel(self.forest_.effect(X))
