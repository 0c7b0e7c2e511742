"""Causal estimators: arrays in, estimates out (no files, SQL or orchestration).

    from estimators import IPW
    res = IPW(stabilized=True).fit(X, t, y).effect()      # EffectEstimate
"""

from estimators.doubly_robust import AIPW, DoubleML
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.forest import CausalForest
from estimators.iv import TwoStageLeastSquares
from estimators.matching import PSMatching
from estimators.outcome_models import Standardization, TLearner
from estimators.stratification import PSStratification
from estimators.weighting import IPW, Crude, OverlapWeights

__all__ = [
    "AIPW",
    "IPW",
    "CausalForest",
    "Crude",
    "DoubleML",
    "EffectEstimate",
    "EstimationError",
    "OverlapWeights",
    "PSMatching",
    "PSStratification",
    "Standardization",
    "TLearner",
    "TwoStageLeastSquares",
]
