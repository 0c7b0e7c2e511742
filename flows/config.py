"""The study file: pydantic models of the YAML contract in ARCHITECTURE.md, and its loader.

Every documented key parses and validates. A key whose behaviour is not built yet is rejected
with "not supported yet" rather than silently ignored, so a study never runs a design other
than the one its file describes. Errors name the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
import reprlib
import typing
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cohort.atlas import read_atlas_concept_set
from cohort.design import (
    COVARIATE_DOMAINS,
    DEATH,
    BatteryDef,
    CohortDesign,
    ComparatorDef,
    ConceptItem,
    ConceptSetDef,
    Criterion,
    DiseaseDef,
    OutcomeDef,
    ScreenDef,
)

IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
CONCEPT_SET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
SUPPORTED_ESTIMATORS = ("crude", "iptw", "overlap", "ps_strata", "ps_match")
DEFAULT_ESTIMATORS = ("crude", "iptw", "ps_strata")  # quick and CohortMethod-like
PLANNED_ESTIMATORS = ("aipw", "standardization", "dml")


class StudyFileError(Exception):
    """A study file that cannot be used; the message is one line naming file, line and field."""


def not_supported(what: str) -> ValueError:
    return ValueError(f"{what} is not supported yet")


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` would switch a gate or a bound off silently
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


def _no_bool(value: Any) -> Any:
    """YAML's true/false would otherwise pass as concept ids 1 and 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a concept id (a positive integer), got {value!r}")
    return value


# OMOP concept ids are 32-bit integers (CDM spec); covariate ids multiply them by 1000.
MAX_CONCEPT_ID = 2_147_483_647
ConceptId = Annotated[int, BeforeValidator(_no_bool), Field(gt=0, le=MAX_CONCEPT_ID)]


def _no_control_characters(value: str) -> str:
    """A path with a newline, tab or NUL cannot be a CDM and would break one-line messages."""
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError(f"contains a control character (newline, tab, NUL...): "
                         f"{_short_repr(value)}")
    return value


class SourceCode(_Strict):
    """A source vocabulary code (ICD10CM K92.2), or a code family with a trailing * (G30*)."""

    vocabulary: Annotated[str, Field(min_length=1, max_length=40)]
    code: Annotated[str, Field(min_length=1, max_length=60)]
    exclude: bool = False
    descendants: bool = True

    @field_validator("vocabulary", "code")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable() or value != value.strip():
            raise ValueError(f"expected a code without spaces around it or control characters, "
                             f"got {value!r}")
        if "*" in value[:-1]:
            raise ValueError(f"'*' may only end a code (a code family), got {value!r}")
        return value


class ConceptSet(_Strict):
    """OMOP concept ids; descendants (via concept_ancestor) are included unless switched off.

    Also source codes mapped to standard concepts ("Maps to") and ATLAS concept-set JSON files.
    """

    include: list[ConceptId] = Field(default_factory=list)
    exclude: list[ConceptId] = Field(default_factory=list)
    descendants: bool = True
    codes: list[SourceCode] = Field(default_factory=list)
    atlas: Annotated[str, Field(min_length=1), AfterValidator(_no_control_characters)] | None = None

    @model_validator(mode="after")
    def _check(self) -> ConceptSet:
        if not self.include and not any(not c.exclude for c in self.codes) and not self.atlas:
            raise ValueError("expected at least one concept id under 'include', a code under "
                             "'codes' or an 'atlas' file")
        return self


GENDERS = {"male": 8507, "female": 8532}


class CriterionSpec(_Strict):
    """A concept set recorded (or not) in a window of days around time zero."""

    concept_set: str
    window: tuple[int, int] = (-365, 0)
    min_count: int = Field(1, ge=1, le=1000)

    @field_validator("window")
    @classmethod
    def _window(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start > end:
            raise ValueError(f"window [{start}, {end}] starts after it ends")
        if start < -36_500 or end > 36_500:
            raise ValueError(f"window [{start}, {end}] reaches more than 100 years")
        return value


class NonUsers(_Strict):
    """How non-users get a time zero (see cohort/comparators.py for the trade-offs)."""

    index: Literal["matched_calendar", "random_visit"] = "matched_calendar"


class Battery(_Strict):
    """Trials per candidate against single drugs: `random` ones drawn from the other screened
    ingredients, `same_class` ones from those sharing an ATC class of `atc_level` ("all", or
    at most that many drawn at random; 0 = none)."""

    random: int = Field(10, ge=0, le=1000, strict=True)  # strict: YAML's true is no count
    same_class: int | Literal["all"] = 10
    atc_level: int = Field(2, ge=1, le=5, strict=True)

    @field_validator("same_class", mode="before")
    @classmethod
    def _same_class_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected a number of trials or 'all', got {value!r}")
        return value

    @field_validator("same_class")
    @classmethod
    def _same_class(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 1000:
            raise ValueError(f"expected 0 to 1000 trials or 'all', got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Battery:
        if self.random == 0 and self.same_class == 0:
            raise ValueError("a battery needs random or same_class trials (both are 0)")
        return self


class Comparator(_Strict):
    """{active: NAME} | {other_candidates: true} | {non_users: {index: ...}} |
    {battery: {random: N, same_class: N | all, atc_level: 2}}, optionally with max_ratio
    (comparator persons per treated person, sampled at random) and seed."""

    active: str | None = None
    non_users: NonUsers | None = None
    other_candidates: bool | None = None
    battery: Battery | None = None
    max_ratio: float | None = Field(None, gt=0, le=1000)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _check(self) -> Comparator:
        given = [k for k in ("active", "non_users", "other_candidates", "battery")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("expected exactly one of {active: NAME}, {other_candidates: true}, "
                             "{non_users: {index: matched_calendar | random_visit}} or "
                             "{battery: {random: N, same_class: N}}")
        return self

    @property
    def kind(self) -> str:
        if self.active is not None:
            return "active"
        if self.battery is not None:
            return "battery"
        return "other_candidates" if self.other_candidates else "non_users"


class Disease(_Strict):
    """A disease cohort: time zero falls `window` days after the disease's first record."""

    concept_set: str
    window: tuple[int, int | None] = (0, None)

    @field_validator("window")
    @classmethod
    def _window(cls, value: tuple[int, int | None]) -> tuple[int, int | None]:
        start, end = value
        if start < 0:
            raise ValueError(f"window [{start}, {end}] starts before the diagnosis; time zero "
                             "must follow it (start >= 0)")
        if end is not None and end < start:
            raise ValueError(f"window [{start}, {end}] starts after it ends")
        if end is not None and end > 36_500:
            raise ValueError(f"window [{start}, {end}] reaches more than 100 years")
        return value


class Propensity(_Strict):
    """How each comparison's propensity model is chosen and fitted."""

    selection: Literal["likelihood", "balance"] = "likelihood"
    max_persons_per_arm: int | None = Field(250_000, ge=100, le=100_000_000)


class Screen(_Strict):
    """Every drug ingredient with at least min_new_users eligible new users."""

    level: Literal["ingredient"] = "ingredient"
    min_new_users: int = Field(500, ge=1, le=10_000_000)
    exclude: list[str | ConceptId] = Field(default_factory=list)


class Population(_Strict):
    prior_observation_days: int = Field(365, ge=0, le=36_500)
    washout_days: int = Field(365, ge=0, le=36_500)
    min_age: int | None = Field(None, ge=0, le=150)
    max_age: int | None = Field(None, ge=0, le=150)
    sex: list[Literal["male", "female"] | ConceptId] = Field(default_factory=list)
    study_start: date | None = None
    study_end: date | None = None
    common_period: bool = False
    require: list[CriterionSpec] = Field(default_factory=list)
    exclude: list[CriterionSpec] = Field(default_factory=list)
    indication: CriterionSpec | None = None
    disease: Disease | None = None
    both_arms: Literal["remove", "first", "keep", "treated"] | None = None

    @model_validator(mode="after")
    def _check(self) -> Population:
        if self.min_age is not None and self.max_age is not None and self.max_age < self.min_age:
            raise ValueError(f"max_age ({self.max_age}) is below min_age ({self.min_age})")
        if self.study_start and self.study_end and self.study_end < self.study_start:
            raise ValueError(f"study_end ({self.study_end}) is before study_start "
                             f"({self.study_start})")
        return self


class FollowUp(_Strict):
    """The risk window: start and end days relative to an anchor, censoring, minimum time."""

    start_day: int = Field(0, ge=-36_500, le=36_500)
    start_anchor: Literal["time_zero", "exposure_end"] = "time_zero"
    end_day: int | None = Field(None, ge=-36_500, le=36_500)
    end_anchor: Literal["time_zero", "exposure_end"] | None = None
    strategy: Literal["intention_to_treat", "on_treatment"] = "intention_to_treat"
    gap_days: int | None = Field(None, ge=0, le=3650)
    censor_at_death: bool = True
    censor_at_switch: bool = False
    max_days: int | None = Field(None, ge=1, le=36_500)
    min_days_at_risk: int = Field(1, ge=1, le=36_500)
    exclude_prior_outcome: bool = True
    prior_outcome_lookback_days: int | None = Field(None, ge=1, le=36_500)

    @model_validator(mode="after")
    def _check(self) -> FollowUp:
        if self.strategy == "on_treatment" and self.end_anchor == "time_zero":
            raise ValueError("strategy on_treatment ends follow-up at the end of exposure; "
                             "use end_anchor exposure_end (or intention_to_treat with end_day)")
        if self.start_anchor == "time_zero" and self.start_day < 0:
            raise ValueError(f"start_day ({self.start_day}) is before time zero; follow-up "
                             "never starts before time zero")
        if (self.end_day is not None and self.start_anchor == self.anchor_end
                and self.end_day < self.start_day):
            raise ValueError(
                f"end_day ({self.end_day}) is before start_day ({self.start_day})"
            )
        return self

    @property
    def anchor_end(self) -> str:
        if self.end_anchor is not None:
            return self.end_anchor
        return "exposure_end" if self.strategy == "on_treatment" else "time_zero"

    @property
    def end_day_resolved(self) -> int | None:
        """None: end of observation; on-treatment without end_day ends with exposure (day 0)."""
        if self.end_day is None and self.anchor_end == "exposure_end":
            return 0
        return self.end_day

    @property
    def gap_days_resolved(self) -> int:
        """Records this close form one exposure episode (30 days when on treatment)."""
        if self.gap_days is not None:
            return self.gap_days
        return 30 if "exposure_end" in (self.anchor_end, self.start_anchor) else 0


class Covariates(_Strict):
    windows: list[tuple[int, int]] = Field(default_factory=lambda: [(-365, -1), (-30, -1)])
    domains: list[str] = Field(
        default_factory=lambda: ["condition", "drug", "procedure", "measurement", "demographics"]
    )
    min_prevalence: float = Field(0.001, ge=0.0, lt=1.0)

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not value:
            raise ValueError("at least one window is needed")
        if len(value) > 9:
            raise ValueError("at most 9 windows are supported")
        for start, end in value:
            if start > end:
                raise ValueError(f"window [{start}, {end}] starts after it ends")
            if end > 0:
                raise ValueError(
                    f"window [{start}, {end}] reaches after time zero; covariates must be "
                    "measured on or before day 0"
                )
            if start < -36_500:
                raise ValueError(f"window [{start}, {end}] reaches back more than 100 years")
        if len(set(value)) != len(value):
            raise ValueError("a window is listed twice")
        return value

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        for domain in value:
            if domain not in COVARIATE_DOMAINS:
                raise ValueError(
                    f"unknown covariate domain {domain!r} (expected one of "
                    f"{', '.join(COVARIATE_DOMAINS)})"
                )
        if len(set(value)) != len(value):
            raise ValueError("a domain is listed twice")
        return value


class Diagnostics(_Strict):
    max_smd: float = Field(0.1, gt=0)
    min_equipoise: float = Field(0.2, ge=0, le=1)
    max_mdrr: float = Field(10.0, gt=1)
    max_ease: float = Field(0.25, gt=0)
    # a trial is balanced when at most this share of covariates has |SMD| > max_smd (Zang: 2%)
    max_share_imbalanced: float | None = Field(None, ge=0, le=1)
    # a screened candidate is reported when at least this share of its trials balance
    min_balanced_rate: float = Field(0.1, ge=0, le=1)


class PositiveControls(_Strict):
    """Synthetic positive controls injected on every negative control (MethodEvaluation)."""

    effect_sizes: list[Annotated[float, Field(gt=1, le=20)]] = Field(
        default_factory=lambda: [1.5, 2.0, 4.0], min_length=1)


MIN_MEMORY_BYTES, MAX_MEMORY_BYTES = 100 * 10**6, 1000 * 10**12
MEMORY_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def memory_bytes(value: str) -> float:
    """Bytes of a DuckDB memory limit such as "6GB" or "512 MiB" (the pattern is checked)."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B)", value).groups()
    return float(number) * MEMORY_UNITS[unit]


class Execution(_Strict):
    """Where the comparison tasks run (the command line overrides it); not part of the run id."""

    runner: Literal["threads", "processes", "dask"] = "threads"
    workers: int = Field(2, ge=1, le=1024)
    dask_address: str | None = None
    # DuckDB while building cohorts: memory limit ("6GB"), threads, spill directory
    memory_limit: Annotated[str, Field(pattern=r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
                            ] | None = None
    threads: int | None = Field(None, ge=1, le=1024)
    temp_directory: Annotated[str, Field(min_length=1), AfterValidator(_no_control_characters)
                              ] | None = None

    @field_validator("memory_limit")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        """DuckDB refuses (mid-run) or cannot work within limits outside this range."""
        if value is not None and not MIN_MEMORY_BYTES <= memory_bytes(value) <= MAX_MEMORY_BYTES:
            raise ValueError(f"expected a memory limit between 100MB and 1000TB, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Execution:
        if self.dask_address is not None and self.runner != "dask":
            raise ValueError("dask_address needs runner: dask")
        if self.dask_address is not None and not re.fullmatch(r"[a-z]+://\S+",
                                                               self.dask_address):
            raise ValueError(f"expected a scheduler address like tcp://host:8786, got "
                             f"{self.dask_address!r}")
        return self


class TreatmentScreen(_Strict):
    screen: Screen


class StudyConfig(_Strict):
    """A validated study file."""

    study: str
    description: str = Field("", max_length=10_000)
    source: Annotated[str, Field(min_length=1), AfterValidator(_no_control_characters)]
    concept_sets: dict[str, ConceptSet]
    exposure_table: Literal["drug_era", "drug_exposure"] = "drug_era"
    treatments: list[str] | TreatmentScreen
    comparator: Comparator
    time_zero: Literal["first_exposure"] = "first_exposure"
    population: Population = Field(default_factory=Population)
    outcomes: list[str]
    negative_controls: list[str | ConceptId] = Field(default_factory=list)
    positive_controls: PositiveControls | None = None
    follow_up: FollowUp = Field(default_factory=FollowUp)
    covariates: Covariates = Field(default_factory=Covariates)
    estimators: list[str] = Field(default_factory=lambda: list(DEFAULT_ESTIMATORS))
    horizon_days: int | None = None
    diagnostics: Diagnostics = Field(default_factory=Diagnostics)
    propensity: Propensity = Field(default_factory=Propensity)
    # strict: YAML's true would otherwise become 1; 0 would mask nothing
    min_cell_count: int = Field(5, ge=1, le=1000, strict=True)
    schedule: str | None = None
    execution: Execution | None = None

    @field_validator("study")
    @classmethod
    def _study(cls, value: str) -> str:
        if not IDENTIFIER.fullmatch(value):  # match() would let a trailing newline through
            raise ValueError(
                "expected an identifier: a letter, then letters, digits, _ or - (at most 63)"
            )
        return value

    @field_validator("concept_sets")
    @classmethod
    def _names(cls, value: dict[str, ConceptSet]) -> dict[str, ConceptSet]:
        for name in value:
            if name in ("other_candidates", "non_users"):
                raise ValueError(f"concept-set name {name!r} is reserved (it names a comparator "
                                 "kind)")
            if not CONCEPT_SET_NAME.fullmatch(name):
                raise ValueError(
                    f"concept-set name {name!r} is not an identifier (a letter, then letters, "
                    "digits or _)"
                )
        if not value:
            raise ValueError("at least one concept set is needed")
        return value

    @field_validator("treatments", mode="before")
    @classmethod
    def _treatments(cls, value: Any) -> Any:
        if isinstance(value, dict) and "screen" not in value:
            raise ValueError("expected a list of concept-set names or {screen: {...}}")
        if isinstance(value, list):
            if not value:
                raise ValueError("at least one treatment is needed")
            if len(set(map(str, value))) != len(value):
                raise ValueError("a treatment is listed twice")
        return value

    @field_validator("outcomes")
    @classmethod
    def _outcomes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one outcome is needed")
        if len(set(value)) != len(value):
            raise ValueError("an outcome is listed twice")
        return value

    @field_validator("negative_controls", mode="before")
    @classmethod
    def _control_items(cls, value: Any) -> Any:
        """Name the bad item (the str | int union would report only its str branch)."""
        for item in value if isinstance(value, list) else ():
            if isinstance(item, str):
                continue
            if isinstance(item, bool) or not isinstance(item, int) or not (
                    0 < item <= MAX_CONCEPT_ID):
                raise ValueError(
                    f"expected concept-set names or concept ids (positive integers), got "
                    f"{_short_repr(item)}"
                )
        return value

    @field_validator("negative_controls")
    @classmethod
    def _controls(cls, value: list[str | int]) -> list[str | int]:
        if len(set(value)) != len(value):
            raise ValueError("a negative control is listed twice")
        return value

    @field_validator("estimators")
    @classmethod
    def _estimators(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one estimator is needed")
        for name in value:
            if name in PLANNED_ESTIMATORS:
                raise not_supported(f"estimator '{name}'")
            if name not in SUPPORTED_ESTIMATORS:
                raise ValueError(
                    f"unknown estimator {name!r} (expected one of "
                    f"{', '.join(SUPPORTED_ESTIMATORS)})"
                )
        return list(dict.fromkeys(value))

    @field_validator("horizon_days")
    @classmethod
    def _horizon(cls, value: int | None) -> int | None:
        if value is not None:
            raise not_supported("'horizon_days' (risk difference / risk ratio estimators)")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        """A cron string as the Prefect server accepts it (for `cohortflow serve`)."""
        if value is not None:
            from prefect.schedules import validate_cron_string  # only for scheduled studies

            validate_cron_string(value)
        return value

    @property
    def treatment_names(self) -> list[str]:
        return self.treatments if isinstance(self.treatments, list) else []

    @model_validator(mode="after")
    def _references(self) -> StudyConfig:
        known = self.concept_sets
        screen = None if isinstance(self.treatments, list) else self.treatments.screen
        checks = [
            ("treatments", self.treatment_names),
            ("comparator.active", [self.comparator.active] if self.comparator.active else []),
            ("outcomes", [o for o in self.outcomes if o != DEATH or o in known]),
            ("negative_controls", [n for n in self.negative_controls if isinstance(n, str)]),
            ("treatments.screen.exclude",
             [n for n in (screen.exclude if screen else []) if isinstance(n, str)]),
        ]
        population = self.population
        criteria = [("population.require", c) for c in population.require] + [
            ("population.exclude", c) for c in population.exclude] + (
            [("population.indication", population.indication)] if population.indication else [])
        if population.disease:
            criteria.append(("population.disease", population.disease))
        checks += [(f"{field}.concept_set", [c.concept_set]) for field, c in criteria]
        for field, names in checks:
            for name in names:
                if name not in known:
                    raise ValueError(
                        f"{field}: unknown concept set {name!r} (defined: "
                        f"{', '.join(sorted(known))})"
                    )
        if self.comparator.active in self.treatment_names:
            raise ValueError(
                f"comparator.active: {self.comparator.active!r} is also a treatment"
            )
        if self.comparator.kind == "battery" and screen is None:
            raise ValueError("comparator.battery: draws comparator drugs from a screen; use "
                             "treatments: {screen: {...}}")
        if (self.comparator.kind == "other_candidates" and screen is None
                and len(self.treatment_names) < 2):
            raise ValueError("comparator.other_candidates: needs at least two treatments (or a "
                             "screen)")
        follow_up = self.follow_up
        if self.comparator.kind == "non_users" and "exposure_end" in (
                follow_up.anchor_end, follow_up.start_anchor):
            raise ValueError("follow_up.strategy: non-users have no exposure to end; use "
                             "intention_to_treat with non_users comparators")
        if self.positive_controls is not None and not self.negative_controls:
            raise ValueError(
                "positive_controls: synthetic positive controls are built from negative "
                "controls; list some under negative_controls"
            )
        clash = set(self.outcomes) & {n for n in self.negative_controls if isinstance(n, str)}
        if clash:
            raise ValueError(
                f"negative_controls: {sorted(clash)} also listed as outcomes of interest"
            )
        return self

    def sha256(self) -> str:
        """Hash of the validated content (not the file's formatting): the study's identity."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def design(self, atlas: dict[str, tuple[ConceptItem, ...]] | None = None) -> CohortDesign:
        """The cohort layer's view of this study; `atlas` holds the items read from ATLAS files."""
        atlas = atlas or {}
        sets = {}
        for name, cs in self.concept_sets.items():
            codes = tuple(ConceptItem(vocabulary=c.vocabulary, code=c.code, excluded=c.exclude,
                                      descendants=c.descendants) for c in cs.codes)
            sets[name] = ConceptSetDef(name, tuple(cs.include), tuple(cs.exclude),
                                       cs.descendants, codes + atlas.get(name, ()),
                                       cs.atlas or "")
        outcomes = [OutcomeDef(name, "outcome") for name in self.outcomes]
        for control in self.negative_controls:
            if isinstance(control, int):
                name = f"concept_{control}"
                sets.setdefault(name, ConceptSetDef(name, (control,), (), True))
            else:
                name = control
            outcomes.append(OutcomeDef(name, "negative_control"))
        comparator, population, follow_up = self.comparator, self.population, self.follow_up
        screen = None if isinstance(self.treatments, list) else self.treatments.screen
        kind = comparator.kind
        max_ratio = comparator.max_ratio
        if max_ratio is None and kind == "non_users":
            max_ratio = 10.0  # the whole database is the pool otherwise
        criteria = tuple(
            Criterion(kind, c.concept_set, tuple(c.window), c.min_count)
            for kind, listed in (("require", population.require),
                                 ("exclude", population.exclude),
                                 ("indication", [population.indication]
                                  if population.indication else []))
            for c in listed)
        both_arms = population.both_arms or {"active": "remove", "other_candidates": "first",
                                             "non_users": "keep", "battery": "treated"}[kind]
        battery = comparator.battery
        disease = population.disease
        return CohortDesign(
            concept_sets=sets,
            exposure_table=self.exposure_table,
            comparisons=tuple((t, comparator.active or kind) for t in self.treatment_names),
            prior_observation_days=population.prior_observation_days,
            washout_days=population.washout_days,
            min_age=population.min_age,
            outcomes=tuple(dict.fromkeys(outcomes)),
            risk_start_day=follow_up.start_day,
            risk_end_day=follow_up.end_day_resolved,
            exclude_prior_outcome=follow_up.exclude_prior_outcome,
            covariate_windows=tuple(tuple(w) for w in self.covariates.windows),
            covariate_domains=tuple(self.covariates.domains),
            min_prevalence=self.covariates.min_prevalence,
            screen=(ScreenDef(screen.level, screen.min_new_users, tuple(screen.exclude))
                    if screen else None),
            comparator=ComparatorDef(
                kind, comparator.active,
                comparator.non_users.index if comparator.non_users else "matched_calendar",
                max_ratio, comparator.seed,
                BatteryDef(battery.random,
                           None if battery.same_class == "all" else battery.same_class,
                           battery.atc_level) if battery else None),
            max_age=population.max_age,
            sexes=tuple(GENDERS.get(s, s) for s in population.sex),
            study_start=population.study_start,
            study_end=population.study_end,
            common_period=population.common_period,
            criteria=criteria,
            both_arms=both_arms,
            disease=DiseaseDef(disease.concept_set, tuple(disease.window)) if disease else None,
            risk_start_anchor=follow_up.start_anchor,
            risk_end_anchor=follow_up.anchor_end,
            gap_days=follow_up.gap_days_resolved,
            censor_at_death=follow_up.censor_at_death,
            censor_at_switch=follow_up.censor_at_switch,
            max_follow_up_days=follow_up.max_days,
            min_days_at_risk=follow_up.min_days_at_risk,
            prior_outcome_lookback_days=follow_up.prior_outcome_lookback_days,
        )


class LoadedStudy(BaseModel):
    """A validated study with where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    config: StudyConfig
    source_path: Path
    atlas: dict[str, tuple[ConceptItem, ...]] = Field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """The validated content plus the concept sets read from ATLAS files."""
        if not self.atlas:
            return self.config.sha256()
        items = {name: [repr(item) for item in items] for name, items in self.atlas.items()}
        canonical = json.dumps([self.config.sha256(), items], sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def design(self) -> CohortDesign:
        return self.config.design(self.atlas)


def load_study(path: str | Path) -> LoadedStudy:
    """Read, parse and validate a study file; raise StudyFileError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise StudyFileError(f"{path}: no such study file (or not a regular file)")
    root, data = _parse_yaml(path)
    if not isinstance(data, dict):
        raise StudyFileError(f"{path}: expected a mapping of study keys at the top level")
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise StudyFileError(_describe(path, root, exc)) from None
    try:
        source = Path(config.source).expanduser()
    except RuntimeError as exc:  # "~someone/..." for an unknown user
        line = _line_of(root, ["source"])
        raise StudyFileError(f"{path}:{line}: source: cannot expand the path ({exc})") from None
    if not source.is_absolute():
        source = (path.parent / source).resolve()
    atlas = {}
    for name, concept_set in config.concept_sets.items():
        if concept_set.atlas is None:
            continue
        file = Path(concept_set.atlas).expanduser()
        file = file if file.is_absolute() else path.parent / file
        try:
            atlas[name] = read_atlas_concept_set(file)
        except ValueError as exc:
            line = _line_of(root, ["concept_sets", name, "atlas"])
            raise StudyFileError(f"{path}:{line}: concept_sets.{name}.atlas: {exc}") from None
    return LoadedStudy(path=path, config=config, source_path=source, atlas=atlas)


# A study file is hand-written: these bounds are far above any real one and keep a hostile file
# (YAML aliases expanding to billions of nodes, a 50 MB description) cheap to refuse.
MAX_STUDY_FILE_BYTES = 1_000_000
MAX_YAML_NODES = 100_000  # scalars, lists and mappings after expanding aliases


def _parse_yaml(path: Path) -> tuple[yaml.Node | None, Any]:
    """Read and parse the file once: its node tree (for line numbers) and its data, refusing
    oversized files and aliases that expand beyond MAX_YAML_NODES before building anything."""
    if path.stat().st_size > MAX_STUDY_FILE_BYTES:
        raise StudyFileError(f"{path}: {path.stat().st_size:,} bytes; a study file may have at "
                             f"most {MAX_STUDY_FILE_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyFileError(f"{path}: cannot read the file ({exc})") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        _check_expanded_size(path, root)
        _check_duplicate_keys(path, root)
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StudyFileError(f"{path}{where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise StudyFileError(f"{path}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    return root, data


def _check_expanded_size(path: Path, root: yaml.Node | None) -> None:
    """Refuse a document whose aliases expand beyond MAX_YAML_NODES ("billion laughs") or
    refer to themselves; each node is sized once, so the check itself stays cheap."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)] if root is not None else []
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([part for pair in node.value for part in pair]
                    if isinstance(node, yaml.MappingNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else [])
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                line = node.start_mark.line + 1
                raise StudyFileError(
                    f"{path}:{line}: the document expands (through YAML aliases) to more than "
                    f"{MAX_YAML_NODES:,} values; a study file may not")
            continue
        if id(node) in open_nodes:
            raise StudyFileError(f"{path}:{node.start_mark.line + 1}: a YAML alias refers to "
                                 "itself (a recursive structure)")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)


def _check_duplicate_keys(path: Path, root: yaml.Node | None) -> None:
    """Refuse a key given twice in one mapping (PyYAML would silently keep the last one)."""
    seen: set[int] = set()  # aliases share nodes: visit each once (no "billion laughs")
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, where = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                name = f"{where}{key.value}" if isinstance(key, yaml.ScalarNode) else where
                line = key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode) and key.value in first:
                    raise StudyFileError(
                        f"{path}:{line}: {name}: duplicate key (first given on line "
                        f"{first[key.value]})"
                    )
                if isinstance(key, yaml.ScalarNode):
                    first[key.value] = line
                stack.append((value, f"{name}."))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}{i}.") for i, item in enumerate(node.value))


def _short_repr(value: Any) -> str:
    """repr bounded in length and depth (an input built from YAML aliases can be huge)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict = 2, 4, 4
    short.maxstring = short.maxother = 60
    return short.repr(value)


def _describe(path: Path, root: yaml.Node | None, exc: ValidationError) -> str:
    """One line for the first validation error: file:line: field: what was expected."""
    error = max(exc.errors(), key=lambda e: len(e["loc"]))  # the most specific one
    branches = {model.__name__ for model in _Strict.__subclasses__()}  # union branches
    loc = [p for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p in branches))]
    kind, message = error["type"], error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    named = re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", message)
    if not loc and named:  # a cross-field check names its own field
        loc, message = named.group(1).split("."), named.group(2)
    field = ".".join(str(p) for p in loc) or "(top level)"
    missing_item = kind == "missing" and bool(loc) and isinstance(loc[-1], int)  # [-365]
    line = None if kind == "missing" and not missing_item else _line_of(root, loc)
    where = f"{path}:{line}" if line else str(path)
    if kind == "extra_forbidden":
        message = "unknown key"
        parent = _model_at(loc[:-1])
        if parent is not None:
            message += f" (expected one of: {', '.join(parent.model_fields)})"
    elif missing_item:
        message = "a value is missing (too few items)"
    elif kind == "missing":
        message = "required key is missing"
    elif kind != "value_error" and "input" in error:
        message = f"{message}, got {_short_repr(error['input'])}"
    message = message.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever it quotes
    return f"{where}: {field}: {message}"


def _model_at(loc: list[Any]) -> type[BaseModel] | None:
    """The study-file model at a field path (through optional fields: `Battery | None`)."""
    model: type[BaseModel] = StudyConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        models = [a for a in (typing.get_args(annotation) or (annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) != 1:
            return None
        model = models[0]
    return model


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """1-based line of the deepest YAML node along loc (best effort)."""
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
