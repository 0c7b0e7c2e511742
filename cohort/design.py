"""The cohort layer's description of a study design: plain frozen values, no config parsing.

`flows.config` turns a study file into a CohortDesign; everything under `cohort/` works from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

COVARIATE_DOMAINS = ("condition", "drug", "procedure", "measurement", "demographics")


@dataclass(frozen=True)
class ConceptSetDef:
    """Named OMOP concept ids, optionally widened to their descendants."""

    name: str
    include: tuple[int, ...]
    exclude: tuple[int, ...] = ()
    descendants: bool = True


@dataclass(frozen=True)
class OutcomeDef:
    """An outcome concept set and its role in the study."""

    name: str
    role: Literal["outcome", "negative_control"] = "outcome"


@dataclass(frozen=True)
class CohortDesign:
    """Everything needed to build the cohorts, covariates and outcomes of every comparison."""

    concept_sets: dict[str, ConceptSetDef]
    exposure_table: Literal["drug_era", "drug_exposure"]
    comparisons: tuple[tuple[str, str], ...]  # (treatment, comparator) concept-set names
    prior_observation_days: int
    washout_days: int
    min_age: int | None
    outcomes: tuple[OutcomeDef, ...]
    risk_start_day: int
    risk_end_day: int | None
    exclude_prior_outcome: bool
    covariate_windows: tuple[tuple[int, int], ...]
    covariate_domains: tuple[str, ...]
    min_prevalence: float

    @property
    def exposure_sets(self) -> list[str]:
        """Concept sets that define treatment arms, each once, in study order."""
        return list(dict.fromkeys(name for pair in self.comparisons for name in pair))
