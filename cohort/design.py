"""The cohort layer's description of a study design: plain frozen values, no config parsing.

`flows.config` turns a study file into a CohortDesign; everything under `cohort/` works from it.
Every field beyond the first few has a default that reproduces the plain new-user design
(active comparator, intention to treat, persons in both arms removed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

COVARIATE_DOMAINS = ("condition", "drug", "procedure", "measurement", "observation", "visit",
                     "demographics", "charlson")
OUTCOME_TABLES = ("condition", "procedure", "measurement", "observation", "death")
DEATH = "death"  # an outcome name that means all-cause death (the death table)


@dataclass(frozen=True)
class ConceptItem:
    """One line of a concept set: a concept id, or a source code (pattern) mapped to standard.

    A code may end in `*` for a code family (G30* = G30, G30.0, G30.9...). `mapped` (ATLAS's
    includeMapped) adds the source concepts that map to the item.
    """

    concept_id: int | None = None
    vocabulary: str | None = None
    code: str | None = None
    excluded: bool = False
    descendants: bool = True
    mapped: bool = False


@dataclass(frozen=True)
class ConceptSetDef:
    """Named OMOP concepts: ids (widened to descendants unless switched off) and further items."""

    name: str
    include: tuple[int, ...] = ()
    exclude: tuple[int, ...] = ()
    descendants: bool = True
    items: tuple[ConceptItem, ...] = ()  # source codes and ATLAS items
    origin: str = ""                     # where the items came from, for messages (ATLAS file)

    def all_items(self) -> tuple[ConceptItem, ...]:
        """include/exclude ids as items, then the other items."""
        listed = tuple(ConceptItem(concept_id=i, descendants=self.descendants)
                       for i in self.include)
        listed += tuple(ConceptItem(concept_id=i, excluded=True, descendants=self.descendants)
                        for i in self.exclude)
        return listed + self.items


@dataclass(frozen=True)
class OutcomeDef:
    """An outcome concept set and its role in the study."""

    name: str
    role: Literal["outcome", "negative_control"] = "outcome"


@dataclass(frozen=True)
class ScreenDef:
    """Every drug ingredient with enough eligible new users becomes a candidate treatment."""

    level: Literal["ingredient"] = "ingredient"
    min_new_users: int = 500
    exclude: tuple[str | int, ...] = ()   # concept-set names, or concept ids of ingredients
    # or of classes above them (e.g. ATC groups: every ingredient below is left out)


@dataclass(frozen=True)
class BatteryDef:
    """A battery of emulated trials per candidate, each against one other screened drug.

    `random` trials draw comparator drugs at random from the other selected candidates;
    `same_class` trials take the other selected candidates that share an ATC class of level
    `atc_level` with the candidate (None: all of them, else at most that many, drawn at
    random). Draws are a stable hash of (candidate, comparator drug, strategy, seed).
    """

    random: int = 10
    same_class: int | None = 10
    atc_level: int = 2

    @property
    def strategies(self) -> tuple[str, ...]:
        """The comparator strategies this battery runs, in study order."""
        return tuple(name for name, size in (("random", self.random),
                                             ("same_class", self.same_class))
                     if size is None or size > 0)


@dataclass(frozen=True)
class ComparatorDef:
    """What each candidate is compared with.

    active: new users of one named drug; other_candidates: new users of any other candidate
    (time zero = first such exposure); non_users: persons not exposed to the candidate by time
    zero, given a time zero by `index_rule`; battery: several trials per candidate, each against
    new users of one other drug (`battery` says which). `max_ratio` samples the comparator arm
    down to at most that many persons per treated person (a stable hash of person and
    comparison).
    """

    kind: Literal["active", "other_candidates", "non_users", "battery"] = "active"
    name: str | None = None
    index_rule: Literal["matched_calendar", "random_visit"] = "matched_calendar"
    max_ratio: float | None = None
    seed: int = 0
    battery: BatteryDef | None = None

    @property
    def single_drug(self) -> bool:
        """Each comparison's comparator arm is the new users of one named drug."""
        return self.kind in ("active", "battery")

    @property
    def pooled(self) -> bool:
        """The comparator arm is built per candidate from a pool (other candidates, non-users)."""
        return self.kind in ("other_candidates", "non_users")


@dataclass(frozen=True)
class DiseaseDef:
    """A disease cohort: time zero must fall `window` days after the first record of the
    disease's concept set (inclusive; None = no upper bound)."""

    concept_set: str
    window: tuple[int, int | None] = (0, None)


@dataclass(frozen=True)
class Criterion:
    """A concept set that must (require, indication) or must not (exclude) be recorded in a
    window of days around time zero, at least `min_count` times."""

    kind: Literal["require", "exclude", "indication"]
    concept_set: str
    window: tuple[int, int] = (-365, 0)
    min_count: int = 1


@dataclass(frozen=True)
class CohortDesign:
    """Everything needed to build the cohorts, covariates and outcomes of every comparison."""

    concept_sets: dict[str, ConceptSetDef]
    exposure_table: Literal["drug_era", "drug_exposure"]
    comparisons: tuple[tuple[str, str], ...]  # (treatment, comparator) names; see treatments
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
    # treatments and comparator; `comparisons` is derived from them when a study sets them
    screen: ScreenDef | None = None
    comparator: ComparatorDef | None = None  # None: the second name of each comparison pair
    # population
    max_age: int | None = None
    sexes: tuple[int, ...] = ()              # gender concept ids kept; () = everyone
    study_start: date | None = None          # time zero on or after
    study_end: date | None = None            # time zero on or before
    common_period: bool = False
    criteria: tuple[Criterion, ...] = ()
    both_arms: Literal["remove", "first", "keep", "treated"] = "remove"
    disease: DiseaseDef | None = None
    # follow-up
    risk_start_anchor: Literal["time_zero", "exposure_end"] = "time_zero"
    risk_end_anchor: Literal["time_zero", "exposure_end"] = "time_zero"
    gap_days: int = 0                        # exposure records this close form one episode
    censor_at_death: bool = True
    censor_at_switch: bool = False
    max_follow_up_days: int | None = None
    min_days_at_risk: int = 1
    prior_outcome_lookback_days: int | None = None  # None: all history before follow-up

    @property
    def exposure_sets(self) -> list[str]:
        """Concept sets that define treatment arms, each once, in study order."""
        return list(dict.fromkeys(name for pair in self.comparisons for name in pair))

    @property
    def treatments(self) -> list[str]:
        return list(dict.fromkeys(t for t, _ in self.comparisons))
