"""A synthetic OMOP CDM v5.3 (one Parquet file per table) with planted, known hazard ratios.

Causal model (all effects are log-linear; ``a`` = (age at index - 55) / 15, ``male`` 0/1):

* Persons: age 20-90 at 2015, sex, a latent health state ``h ~ N(0, 1)``, one observation
  period (mostly starting 2008-2018, 1-12 years, ending by 2020-12-31); ~2% also have an earlier
  period, and ~0.5% extra observation periods belong to person ids with no person row.
* Every person has an index date ``t0`` (>= 365 days into the main period for most; a few
  users start earlier, so prior-observation rules have work). Indications ``I1..I8`` are
  Bernoulli(logit(alpha + beta * a + gamma * h + sex)); a person with ``Ik`` has one
  ``indication_k`` record in the 365 days before ``t0`` plus chronic repeats anywhere in
  observation (a few without ``Ik`` have an old record > 365 days before ``t0``).
* 60% of persons are users of a study drug, started at ``t0``, chosen by a multinomial
  logit on ``I1..I8``, ``a``, ``male`` (confounding by indication) and the unmeasured ``u``
  (below); ~15% restart the same drug after a gap; ~5% of users (comparator users only) later
  add one of the treatments.
* Outcome ``o`` (first event, and an occasional repeat): exponential hazard
  ``base_o * exp(B_o . (I, a, male)) * exp(g_o * u - g_o^2 / 2)`` over the whole observation,
  multiplied by ``HR(drug, o)`` from the day after ``t0`` for a user of ``drug`` (comparator:
  1); events after the end of observation are not recorded, events before ``t0`` are (prior
  outcomes). ``h`` acts on neither outcomes nor drug choice, so covariates in the 365 days
  before ``t0`` plus age and sex capture all measured confounding. An added second drug
  leaves the hazard as it was (intention to treat); its users are in both arms of that
  comparison only, so no comparison vs the comparator is contaminated.
* Unmeasured confounding, strength ``s`` = ``unmeasured_confounding`` (default 1, 0 = off):
  a latent ``u ~ N(0, 1)`` per person, independent of everything measured and recorded in no
  table, adds ``s * delta_d * u`` to the log-odds of choosing treatment ``d`` over the
  comparator (``delta`` 0.65, -0.55, 0.3, -0.7 for drug_a..drug_d: their users differ from
  comparator users by +0.50, -0.44, +0.25, -0.57 SD of ``u``) and gives every outcome, of
  interest or negative control, the mean-one frailty ``exp(g_o u - g_o^2 / 2)`` with
  ``g_o = s * gamma_o`` (``gamma_o`` 0.2-0.4 for outcomes of interest, 0.25-0.45 for negative
  controls). Perfect adjustment for the measured covariates thus leaves a bias of log HR of
  about ``g_o * (mean u of users - mean u of comparator users)``, growing with ``s^2``; at
  ``s = 1`` it averages +0.18, -0.15, +0.09, -0.20 over the negative controls of drug_a..drug_d
  (0.06-0.26 by outcome), and the nominal 95% intervals of propensity-adjusted negative-control
  estimates cover HR 1 ~75-80% of the time at 50,000 persons (~94% at ``s = 0``). This is bias,
  not effect: ``truth.csv`` holds the planted HRs for every ``s``. ``u`` has its own random
  stream, so for a seed ``s`` changes only drug choice (so study-drug records) and outcomes.
* Exposure effect, ``exposure_effect`` (default ``"itt"``): with ``"itt"`` the planted HR acts
  from the day after ``t0`` to the end of observation whatever the person's exposure (drug eras
  record persistence but do not touch risk), the truth an intention-to-treat analysis targets.
  With ``"on_treatment"`` it acts only while the person is exposed to the drug started at
  ``t0``: from the day after ``t0`` through the end of the first exposure episode (the first
  era, joined with a restart of the same drug that begins at most 30 days after it, as the
  cohort engine builds episodes with ``gap_days: 30``) plus a 30-day carry-over, cut at the end
  of observation; the baseline hazard applies before and after. First events after ``t0`` are
  then drawn piecewise-exponentially (vectorised over persons). Discontinuation is mildly
  informative in that mode: the number of 30-day fills of the first era is log-normal with its
  log mean lowered by ``0.25 * s * u``, so persons with a high frailty (high ``u``) stop
  sooner, and an on-treatment analysis that cannot see ``u`` keeps a little selection bias
  besides the confounding by ``u`` (none at ``s = 0``). Persons, drug choice, drug records (at
  ``s = 0``), indications and noise are the same in both modes for a seed; outcome events share
  one random stream, so after the first planted outcome they are other draws from the same
  model (negative controls included). ``"itt"`` output is byte-identical to what the
  generator wrote before the mode existed. The HRs of ``truth.csv`` are per unit of exposed
  time in ``"on_treatment"`` mode, so an ITT analysis over the whole follow-up is diluted
  toward 1 and an on-treatment analysis (``strategy: on_treatment, gap_days: 30, end_day:
  30``) targets them.
* Negative controls (40) have HR 1 for every drug; many depend on indications, age or sex
  (so crude estimates are biased), 12 on nothing measured. Noise concepts (conditions, drugs,
  procedures, measurements) have skewed (Zipf-like) frequencies, depend on ``h`` only and
  affect nothing.
* Planted dirt: orphan observation periods, persons with two periods, early starters, and
  ~0.1% of noise condition records dated up to 180 days after the end of observation.

``generate_demo_cdm`` is vectorised (numpy, pyarrow), deterministic for a seed (strength and
exposure effect), and writes ``truth.csv`` with the planted hazard ratios of the four treatments vs
``comparator_drug`` on the 6 outcomes and 40 negative controls.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "CDM_SCHEMA",
    "COMPARATOR",
    "DEMO_CONCEPTS",
    "DEMO_VOCABULARY_ID",
    "EXPOSURE_EFFECTS",
    "GENDER_FEMALE",
    "GENDER_MALE",
    "GENERATOR_VERSION",
    "INDICATIONS",
    "NEGATIVE_CONTROLS",
    "OUTCOMES",
    "OUTCOME_VARIANT_CONCEPTS",
    "PRODUCT_CONCEPTS",
    "STUDY_DRUGS",
    "TREATMENTS",
    "TRUE_HR",
    "generate_demo_cdm",
    "true_hr",
]

# ----------------------------------------------------------------------------- concepts
GENERATOR_VERSION = 2
"""Bumped whenever the same size, seed and arguments would produce different data (caches check
it). ``exposure_effect="on_treatment"`` (added later) left ``"itt"`` output unchanged, so caches
of generated CDMs key on the mode besides this version when they use it."""
ExposureEffect = Literal["itt", "on_treatment"]
EXPOSURE_EFFECTS: tuple[str, ...] = ("itt", "on_treatment")
"""When the planted HR acts: from ``t0`` on regardless of exposure, or only while exposed."""
DEMO_VOCABULARY_ID = "Cohortflow Demo"
GENDER_MALE = 8507
GENDER_FEMALE = 8532
_BASE = 2_000_000_000  # OMOP reserves concept ids >= 2 billion for local concepts

COMPARATOR = "comparator_drug"
TREATMENTS = ("drug_a", "drug_b", "drug_c", "drug_d")
STUDY_DRUGS = (COMPARATOR, *TREATMENTS)
OUTCOMES = tuple(f"outcome_{k}" for k in range(1, 7))
NEGATIVE_CONTROLS = tuple(f"nc_{k:02d}" for k in range(1, 41))
INDICATIONS = tuple(f"indication_{k}" for k in range(1, 9))

DEMO_CONCEPTS: dict[str, int] = {
    **{d: _BASE + 100 + i for i, d in enumerate(STUDY_DRUGS)},
    **{o: _BASE + 1001 + i for i, o in enumerate(OUTCOMES)},
    **{o: _BASE + 1201 + i for i, o in enumerate(NEGATIVE_CONTROLS)},
    **{c: _BASE + 2001 + i for i, c in enumerate(INDICATIONS)},
}
"""Study concept name -> concept id: ingredients, outcomes, negative controls, indications."""

PRODUCT_CONCEPTS: dict[str, tuple[int, int]] = {
    d: (_BASE + 201 + 10 * i, _BASE + 202 + 10 * i) for i, d in enumerate(STUDY_DRUGS)
}
"""Study ingredient -> its two clinical-drug products (descendants, used in drug_exposure)."""

OUTCOME_VARIANT_CONCEPTS: dict[str, int] = {o: _BASE + 1101 + i for i, o in enumerate(OUTCOMES)}
"""Outcome -> its one descendant concept ("outcome_k, variant"), used for ~35% of events."""

_N_NOISE_CONDITIONS, _N_NOISE_DRUGS, _N_PROCEDURES, _N_MEASUREMENTS = 300, 60, 100, 40
_NOISE_CONDITION_IDS = _BASE + 3001 + np.arange(_N_NOISE_CONDITIONS, dtype=np.int64)
_NOISE_INGREDIENT_IDS = _BASE + 300 + np.arange(_N_NOISE_DRUGS, dtype=np.int64)
_NOISE_PRODUCT_IDS = _BASE + 400 + np.arange(_N_NOISE_DRUGS, dtype=np.int64)
_PROCEDURE_IDS = _BASE + 4001 + np.arange(_N_PROCEDURES, dtype=np.int64)
_MEASUREMENT_IDS = _BASE + 5001 + np.arange(_N_MEASUREMENTS, dtype=np.int64)
_TYPE_EHR = _BASE + 9001  # type concept of every clinical record
_TYPE_PERIOD = _BASE + 9002  # period_type_concept_id

# ----------------------------------------------------------------------------- causal model
_COVARIATES = (*INDICATIONS, "age", "male")

# Indication prevalence: (intercept, age, latent health h, male), logit scale.
_INDICATION_MODEL = np.array([
    [-1.5, 0.5, 0.6, 0.0],
    [-1.7, 0.3, 0.5, 0.0],
    [-1.3, -0.2, 0.4, 0.3],
    [-1.9, 0.6, 0.6, 0.0],
    [-1.6, 0.2, 0.5, -0.3],
    [-1.5, 0.4, 0.3, 0.0],
    [-2.0, 0.0, 0.7, 0.0],
    [-1.2, 0.3, 0.3, 0.0],
])

# Drug choice among users: log-odds vs comparator_drug (intercept, covariate effects).
_CHOICE_MODEL: dict[str, tuple[float, dict[str, float]]] = {
    "drug_a": (-0.90, {"indication_1": 1.0, "indication_2": 0.8, "indication_8": 0.3,
                       "age": 0.2}),
    "drug_b": (-1.25, {"indication_3": 1.0, "indication_4": 0.8, "male": 0.4, "age": -0.3}),
    "drug_c": (-0.75, {"indication_5": 1.2, "indication_1": -0.6, "indication_6": 0.4}),
    "drug_d": (-0.75, {"indication_6": 0.9, "indication_7": 0.7, "indication_2": -0.5,
                       "age": 0.3}),
}

# Unmeasured confounder u ~ N(0, 1): log-odds per unit of u (times the strength) of choosing
# each treatment over comparator_drug; users then differ from comparator users by ~0.8 times
# this many SDs of u.
_U_CHOICE: dict[str, float] = {"drug_a": 0.65, "drug_b": -0.55, "drug_c": 0.3, "drug_d": -0.7}

# Outcome hazards: (events per person-year for a reference person, averaged over u; log hazard
# per unit of u (gamma, times the strength); log hazard ratios of measured covariates).
_OUTCOME_MODEL: dict[str, tuple[float, float, dict[str, float]]] = {
    "outcome_1": (0.012, 0.25, {"indication_1": 0.9, "indication_2": 0.5, "indication_3": 0.9,
                                "indication_4": 0.5}),
    "outcome_2": (0.020, 0.35, {"indication_2": 0.8, "indication_8": 0.5, "age": 0.3}),
    "outcome_3": (0.020, 0.20, {"indication_4": 0.3, "age": 0.8, "male": -0.4}),
    "outcome_4": (0.012, 0.30, {"indication_5": -1.0, "indication_1": 0.8, "age": 0.4}),
    "outcome_5": (0.015, 0.40, {"indication_5": 1.0, "indication_7": 0.5, "age": 0.2}),
    "outcome_6": (0.015, 0.30, {"indication_1": 0.5, "indication_8": 0.6, "age": 0.3,
                                "male": 0.3}),
    "nc_01": (0.010, 0.35, {"indication_1": 0.7, "age": 0.3}),
    "nc_02": (0.010, 0.30, {"indication_3": 0.7}),
    "nc_03": (0.010, 0.40, {"indication_5": 0.7}),
    "nc_04": (0.008, 0.25, {"indication_6": 0.6, "indication_7": 0.6}),
    "nc_05": (0.008, 0.45, {"indication_2": 0.6, "indication_4": 0.5}),
    "nc_06": (0.010, 0.35, {"age": 0.5}),
    "nc_07": (0.010, 0.30, {"male": 0.4}),
    "nc_08": (0.010, 0.40, {"indication_8": 0.5}),
    "nc_09": (0.010, 0.35, {}),
    "nc_10": (0.010, 0.25, {"age": 0.3, "indication_4": 0.4}),
    "nc_11": (0.008, 0.35, {"indication_2": 0.7}),
    "nc_12": (0.012, 0.30, {}),
    "nc_13": (0.009, 0.40, {"indication_7": 0.6, "age": 0.2}),
    "nc_14": (0.010, 0.25, {}),
    "nc_15": (0.008, 0.45, {"indication_1": 0.5, "indication_5": 0.5}),
    "nc_16": (0.010, 0.35, {"age": -0.3}),
    "nc_17": (0.008, 0.40, {}),
    "nc_18": (0.009, 0.30, {"indication_3": 0.5, "male": 0.3}),
    "nc_19": (0.010, 0.45, {}),
    "nc_20": (0.008, 0.35, {"indication_6": 0.7}),
    "nc_21": (0.012, 0.25, {"age": 0.4, "male": -0.3}),
    "nc_22": (0.008, 0.40, {}),
    "nc_23": (0.009, 0.35, {"indication_4": 0.6}),
    "nc_24": (0.010, 0.30, {"indication_8": 0.4, "age": 0.2}),
    "nc_25": (0.008, 0.45, {}),
    "nc_26": (0.010, 0.35, {"indication_1": 0.4, "indication_2": 0.4}),
    "nc_27": (0.009, 0.25, {}),
    "nc_28": (0.008, 0.40, {"indication_5": -0.5, "age": 0.3}),
    "nc_29": (0.010, 0.35, {"indication_7": 0.5}),
    "nc_30": (0.011, 0.30, {}),
    "nc_31": (0.008, 0.45, {"indication_3": 0.6, "indication_6": 0.3}),
    "nc_32": (0.010, 0.35, {"male": 0.5}),
    "nc_33": (0.009, 0.40, {}),
    "nc_34": (0.008, 0.25, {"indication_2": 0.5, "indication_8": 0.4}),
    "nc_35": (0.010, 0.35, {"age": 0.6}),
    "nc_36": (0.009, 0.30, {}),
    "nc_37": (0.008, 0.45, {"indication_4": 0.5, "indication_1": -0.4}),
    "nc_38": (0.010, 0.35, {"indication_6": 0.4, "male": -0.2}),
    "nc_39": (0.009, 0.40, {}),
    "nc_40": (0.008, 0.30, {"indication_5": 0.6, "indication_7": 0.3}),
}

TRUE_HR: dict[tuple[str, str], float] = {
    ("drug_a", "outcome_1"): 0.5,
    ("drug_a", "outcome_2"): 0.67,
    ("drug_a", "outcome_6"): 1.5,
    ("drug_b", "outcome_1"): 2.0,
    ("drug_b", "outcome_3"): 1.5,
    ("drug_c", "outcome_4"): 4.0,
    ("drug_c", "outcome_5"): 0.67,
}
"""Planted hazard ratios vs comparator_drug that differ from 1 (every other pair, every
negative control and all of drug_d: 1)."""


def true_hr(treatment: str, outcome: str) -> float:
    """The planted hazard ratio of ``treatment`` vs comparator_drug on ``outcome``."""
    if treatment == COMPARATOR:
        return 1.0
    return TRUE_HR.get((treatment, outcome), 1.0)


_USER_SHARE = 0.60
_EARLY_START_SHARE = 0.04  # users who start before 365 days of observation
_SWITCH_SHARE = 0.16  # of eligible comparator users: ~5% of all users
_RESTART_SHARE = 0.15
_VARIANT_SHARE = 0.35
_REPEAT_SHARE = 0.15
# exposure_effect="on_treatment": eras of the drug this close form one episode (as the engine's
# gap_days), the effect lasts this long after the episode ends, and the log mean of the first
# era's number of fills drops by this much per unit of (strength x u).
_EPISODE_GAP_DAYS = 30
_CARRY_OVER_DAYS = 30
_DISCONTINUATION_U = 0.25

# ----------------------------------------------------------------------------- schema (v5.3)
_I, _D, _F, _S, _T = "BIGINT", "DATE", "DOUBLE", "VARCHAR", "TIMESTAMP"
CDM_SCHEMA: dict[str, tuple[tuple[str, str], ...]] = {
    "person": (
        ("person_id", _I), ("gender_concept_id", _I), ("year_of_birth", _I),
        ("month_of_birth", _I), ("day_of_birth", _I), ("birth_datetime", _T),
        ("race_concept_id", _I), ("ethnicity_concept_id", _I), ("location_id", _I),
        ("provider_id", _I), ("care_site_id", _I), ("person_source_value", _S),
        ("gender_source_value", _S), ("gender_source_concept_id", _I), ("race_source_value", _S),
        ("race_source_concept_id", _I), ("ethnicity_source_value", _S),
        ("ethnicity_source_concept_id", _I),
    ),
    "observation_period": (
        ("observation_period_id", _I), ("person_id", _I), ("observation_period_start_date", _D),
        ("observation_period_end_date", _D), ("period_type_concept_id", _I),
    ),
    "drug_era": (
        ("drug_era_id", _I), ("person_id", _I), ("drug_concept_id", _I),
        ("drug_era_start_date", _D), ("drug_era_end_date", _D), ("drug_exposure_count", _I),
        ("gap_days", _I),
    ),
    "drug_exposure": (
        ("drug_exposure_id", _I), ("person_id", _I), ("drug_concept_id", _I),
        ("drug_exposure_start_date", _D), ("drug_exposure_start_datetime", _T),
        ("drug_exposure_end_date", _D), ("drug_exposure_end_datetime", _T),
        ("verbatim_end_date", _D), ("drug_type_concept_id", _I), ("stop_reason", _S),
        ("refills", _I), ("quantity", _F), ("days_supply", _I), ("sig", _S),
        ("route_concept_id", _I), ("lot_number", _S), ("provider_id", _I),
        ("visit_occurrence_id", _I), ("visit_detail_id", _I), ("drug_source_value", _S),
        ("drug_source_concept_id", _I), ("route_source_value", _S),
        ("dose_unit_source_value", _S),
    ),
    "condition_occurrence": (
        ("condition_occurrence_id", _I), ("person_id", _I), ("condition_concept_id", _I),
        ("condition_start_date", _D), ("condition_start_datetime", _T),
        ("condition_end_date", _D), ("condition_end_datetime", _T),
        ("condition_type_concept_id", _I), ("stop_reason", _S), ("provider_id", _I),
        ("visit_occurrence_id", _I), ("visit_detail_id", _I), ("condition_source_value", _S),
        ("condition_source_concept_id", _I), ("condition_status_source_value", _S),
        ("condition_status_concept_id", _I),
    ),
    "procedure_occurrence": (
        ("procedure_occurrence_id", _I), ("person_id", _I), ("procedure_concept_id", _I),
        ("procedure_date", _D), ("procedure_datetime", _T), ("procedure_type_concept_id", _I),
        ("modifier_concept_id", _I), ("quantity", _I), ("provider_id", _I),
        ("visit_occurrence_id", _I), ("visit_detail_id", _I), ("procedure_source_value", _S),
        ("procedure_source_concept_id", _I), ("modifier_source_value", _S),
    ),
    "measurement": (
        ("measurement_id", _I), ("person_id", _I), ("measurement_concept_id", _I),
        ("measurement_date", _D), ("measurement_datetime", _T), ("measurement_time", _S),
        ("measurement_type_concept_id", _I), ("operator_concept_id", _I),
        ("value_as_number", _F), ("value_as_concept_id", _I), ("unit_concept_id", _I),
        ("range_low", _F), ("range_high", _F), ("provider_id", _I),
        ("visit_occurrence_id", _I), ("visit_detail_id", _I), ("measurement_source_value", _S),
        ("measurement_source_concept_id", _I), ("unit_source_value", _S),
        ("value_source_value", _S),
    ),
    "observation": (
        ("observation_id", _I), ("person_id", _I), ("observation_concept_id", _I),
        ("observation_date", _D), ("observation_datetime", _T),
        ("observation_type_concept_id", _I), ("value_as_number", _F), ("value_as_string", _S),
        ("value_as_concept_id", _I), ("qualifier_concept_id", _I), ("unit_concept_id", _I),
        ("provider_id", _I), ("visit_occurrence_id", _I), ("visit_detail_id", _I),
        ("observation_source_value", _S), ("observation_source_concept_id", _I),
        ("unit_source_value", _S), ("qualifier_source_value", _S),
    ),
    "death": (
        ("person_id", _I), ("death_date", _D), ("death_datetime", _T),
        ("death_type_concept_id", _I), ("cause_concept_id", _I), ("cause_source_value", _S),
        ("cause_source_concept_id", _I),
    ),
    "visit_occurrence": (
        ("visit_occurrence_id", _I), ("person_id", _I), ("visit_concept_id", _I),
        ("visit_start_date", _D), ("visit_start_datetime", _T), ("visit_end_date", _D),
        ("visit_end_datetime", _T), ("visit_type_concept_id", _I), ("provider_id", _I),
        ("care_site_id", _I), ("visit_source_value", _S), ("visit_source_concept_id", _I),
        ("admitting_source_concept_id", _I), ("admitting_source_value", _S),
        ("discharge_to_concept_id", _I), ("discharge_to_source_value", _S),
        ("preceding_visit_occurrence_id", _I),
    ),
    "concept": (
        ("concept_id", _I), ("concept_name", _S), ("domain_id", _S), ("vocabulary_id", _S),
        ("concept_class_id", _S), ("standard_concept", _S), ("concept_code", _S),
        ("valid_start_date", _D), ("valid_end_date", _D), ("invalid_reason", _S),
    ),
    "concept_ancestor": (
        ("ancestor_concept_id", _I), ("descendant_concept_id", _I),
        ("min_levels_of_separation", _I), ("max_levels_of_separation", _I),
    ),
    "concept_relationship": (
        ("concept_id_1", _I), ("concept_id_2", _I), ("relationship_id", _S),
        ("valid_start_date", _D), ("valid_end_date", _D), ("invalid_reason", _S),
    ),
    "vocabulary": (
        ("vocabulary_id", _S), ("vocabulary_name", _S), ("vocabulary_reference", _S),
        ("vocabulary_version", _S), ("vocabulary_concept_id", _I),
    ),
    "cdm_source": (
        ("cdm_source_name", _S), ("cdm_source_abbreviation", _S), ("cdm_holder", _S),
        ("source_description", _S), ("source_documentation_reference", _S),
        ("cdm_etl_reference", _S), ("source_release_date", _D), ("cdm_release_date", _D),
        ("cdm_version", _S), ("vocabulary_version", _S),
    ),
}
"""Every table written, with its OMOP CDM v5.3 columns and DuckDB types, in file order."""

_ARROW_TYPES = {
    _I: pa.int64(), _D: pa.date32(), _F: pa.float64(), _S: pa.string(),
    _T: pa.timestamp("us"),
}


# ----------------------------------------------------------------------------- helpers
def _day(iso: str) -> int:
    """Days since 1970-01-01."""
    return int(np.datetime64(iso, "D").astype(np.int64))


_FAR_PAST = _day("1900-01-01")
_DATA_END = _day("2020-12-31")


def _rng(seed: int, stream: int) -> np.random.Generator:
    """An independent random stream per component, so components don't shift each other."""
    return np.random.default_rng([seed, stream])


def _zipf_probs(n: int, exponent: float, offset: float) -> np.ndarray:
    p = (np.arange(n) + offset) ** -exponent
    return p / p.sum()


def _draw(rng: np.random.Generator, probs: np.ndarray, size: int) -> np.ndarray:
    """Indices drawn from a categorical distribution (vectorised inverse CDF)."""
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(size), side="right")


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    """Offset of each group's first element, for consecutive groups of ``counts`` sizes."""
    return (np.cumsum(counts) - counts).astype(np.int64)


def _columns(spec: Mapping[str, float], fields: tuple[str, ...] = _COVARIATES) -> np.ndarray:
    unknown = set(spec) - set(fields)
    if unknown:
        raise ValueError(f"unknown covariates {sorted(unknown)}")
    return np.array([spec.get(f, 0.0) for f in fields])


def _arrow(name: str, n: int, values: Mapping[str, object]) -> pa.Table:
    """A table with the v5.3 columns of ``name``: given values, NULL for the others."""
    schema = CDM_SCHEMA[name]
    unknown = set(values) - {c for c, _ in schema}
    if unknown:
        raise ValueError(f"{name}: unknown columns {sorted(unknown)}")
    arrays = []
    for column, kind in schema:
        typ = _ARROW_TYPES[kind]
        if column not in values:
            arrays.append(pa.nulls(n, typ))
            continue
        v = values[column]
        if isinstance(v, np.ndarray) and kind == _D:
            arr = pa.array(v.astype(np.int32), type=pa.int32()).cast(typ)
        elif isinstance(v, np.ndarray) and kind == _T:
            arr = pa.array(v.astype("datetime64[us]"), type=typ)
        elif isinstance(v, np.ndarray) and kind == _F:
            arr = pa.array(v, type=typ, from_pandas=True)  # NaN -> NULL
        elif isinstance(v, (np.ndarray, list)):
            arr = pa.array(v, type=typ)
        else:  # a scalar for every row
            arr = pa.array(np.full(n, v), type=typ) if v is not None else pa.nulls(n, typ)
        if len(arr) != n:
            raise ValueError(f"{name}.{column}: {len(arr)} values for {n} rows")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, names=[c for c, _ in schema])


def _write(out_dir: Path, name: str, table: pa.Table) -> None:
    pq.write_table(table, out_dir / f"{name}.parquet", compression="zstd")


def _person_order(person_id: np.ndarray, start: np.ndarray) -> np.ndarray:
    """A deterministic row order: by person, then date, ties in generation order."""
    key = (person_id.astype(np.int64) << 20) | (start.astype(np.int64) - _FAR_PAST)
    return np.argsort(key, kind="stable")


# ----------------------------------------------------------------------------- table writers
# Shared with cohort.synthetic_screen: each writes one or two CDM tables from record arrays
# (``rows`` index ``person_id``), clinical records in person, date order with ids from 1.
def _write_person(out_dir: Path, person_id: np.ndarray, male: np.ndarray,
                  birth_day: np.ndarray) -> None:
    birth = birth_day.astype("datetime64[D]")
    _write(out_dir, "person", _arrow("person", person_id.size, {
        "person_id": person_id,
        "gender_concept_id": np.where(male, GENDER_MALE, GENDER_FEMALE),
        "year_of_birth": birth.astype("datetime64[Y]").astype(np.int64) + 1970,
        "month_of_birth": (birth.astype("datetime64[M]").astype(np.int64) % 12) + 1,
        "day_of_birth": (birth - birth.astype("datetime64[M]")).astype(np.int64) + 1,
        "birth_datetime": birth,
        "race_concept_id": 0,
        "ethnicity_concept_id": 0,
        "gender_source_value": np.where(male, "M", "F"),
    }))


def _write_observation_periods(out_dir: Path, person_id: np.ndarray, start: np.ndarray,
                               end: np.ndarray) -> None:
    order = _person_order(person_id, start)
    _write(out_dir, "observation_period", _arrow("observation_period", person_id.size, {
        "observation_period_id": np.arange(1, person_id.size + 1, dtype=np.int64),
        "person_id": person_id[order],
        "observation_period_start_date": start[order],
        "observation_period_end_date": end[order],
        "period_type_concept_id": _TYPE_PERIOD,
    }))


def _write_conditions(out_dir: Path, person_id: np.ndarray, rows: np.ndarray,
                      concept: np.ndarray, start: np.ndarray, end: np.ndarray) -> None:
    order = _person_order(rows, start)
    _write(out_dir, "condition_occurrence", _arrow("condition_occurrence", rows.size, {
        "condition_occurrence_id": np.arange(1, rows.size + 1, dtype=np.int64),
        "person_id": person_id[rows[order]],
        "condition_concept_id": concept[order],
        "condition_start_date": start[order],
        "condition_end_date": end[order],
        "condition_type_concept_id": _TYPE_EHR,
    }))


def _write_drug_records(out_dir: Path, person_id: np.ndarray, eras: Mapping[str, np.ndarray],
                        fills: Mapping[str, np.ndarray]) -> None:
    """drug_era and drug_exposure from the columns ``_eras`` returns (concatenated)."""
    order = _person_order(eras["person"], eras["start"])
    _write(out_dir, "drug_era", _arrow("drug_era", order.size, {
        "drug_era_id": np.arange(1, order.size + 1, dtype=np.int64),
        "person_id": person_id[eras["person"][order]],
        "drug_concept_id": eras["concept"][order],
        "drug_era_start_date": eras["start"][order],
        "drug_era_end_date": eras["end"][order],
        "drug_exposure_count": eras["count"][order],
        "gap_days": eras["gap"][order],
    }))
    order = _person_order(fills["person"], fills["start"])
    f_start, f_end = fills["start"][order], fills["end"][order]
    supply = f_end - f_start + 1
    _write(out_dir, "drug_exposure", _arrow("drug_exposure", order.size, {
        "drug_exposure_id": np.arange(1, order.size + 1, dtype=np.int64),
        "person_id": person_id[fills["person"][order]],
        "drug_concept_id": fills["concept"][order],
        "drug_exposure_start_date": f_start,
        "drug_exposure_end_date": f_end,
        "drug_type_concept_id": _TYPE_EHR,
        "refills": 0,
        "quantity": supply.astype(np.float64),
        "days_supply": supply,
    }))


def _write_procedures(out_dir: Path, person_id: np.ndarray, rows: np.ndarray,
                      concept: np.ndarray, day: np.ndarray) -> None:
    """procedure_occurrence as given (``_noise_records`` draws rows in person order)."""
    _write(out_dir, "procedure_occurrence", _arrow("procedure_occurrence", rows.size, {
        "procedure_occurrence_id": np.arange(1, rows.size + 1, dtype=np.int64),
        "person_id": person_id[rows],
        "procedure_concept_id": concept,
        "procedure_date": day,
        "procedure_type_concept_id": _TYPE_EHR,
        "quantity": 1,
    }))


def _write_vocabulary(
    out_dir: Path, concept: Mapping[str, list], ancestor: Mapping[str, np.ndarray],
    vocabularies: list[tuple[str, str, str, str | None]], source: tuple[str, ...],
) -> None:
    """concept, concept_ancestor, vocabulary (id, name, reference, version per row) and the
    one cdm_source row: ``source`` is (name, abbreviation, description, documentation
    reference, ETL reference, ISO release date, vocabulary version)."""
    n_concepts = len(concept["concept_id"])
    _write(out_dir, "concept", _arrow("concept", n_concepts, {
        **concept,
        "valid_start_date": np.full(n_concepts, _day("1970-01-01")),
        "valid_end_date": np.full(n_concepts, _day("2099-12-31")),
    }))
    _write(out_dir, "concept_ancestor",
           _arrow("concept_ancestor", ancestor["ancestor_concept_id"].size, ancestor))
    v = [list(c) for c in zip(*vocabularies, strict=True)]
    _write(out_dir, "vocabulary", _arrow("vocabulary", len(vocabularies), {
        "vocabulary_id": v[0], "vocabulary_name": v[1], "vocabulary_reference": v[2],
        "vocabulary_version": v[3],
        "vocabulary_concept_id": np.zeros(len(vocabularies), dtype=np.int64),
    }))
    name, abbreviation, description, documentation, etl, release, vocabulary = source
    _write(out_dir, "cdm_source", _arrow("cdm_source", 1, {
        "cdm_source_name": [name],
        "cdm_source_abbreviation": [abbreviation],
        "cdm_holder": ["cohortflow"],
        "source_description": [description],
        "source_documentation_reference": [documentation],
        "cdm_etl_reference": [etl],
        "source_release_date": np.array([_day(release)]),
        "cdm_release_date": np.array([_day(release)]),
        "cdm_version": ["v5.3"],
        "vocabulary_version": [vocabulary],
    }))


def _write_csv(path: Path, header: list[str], rows: Iterable[list]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- persons
class _Persons:
    """Person-level arrays of the simulation (index i = person_id - 1)."""

    def __init__(self, n: int, seed: int, unmeasured_confounding: float = 1.0) -> None:
        rng = _rng(seed, 1)
        self.n = n
        self.unmeasured_confounding = unmeasured_confounding
        # The unmeasured confounder: its own stream, so the measured world is the same for
        # every strength; recorded nowhere.
        self.u = _rng(seed, 10).standard_normal(n)
        self.person_id = np.arange(1, n + 1, dtype=np.int64)
        self.male = rng.random(n) < 0.49
        age_2015 = 20.0 + 70.0 * rng.beta(1.8, 2.0, n)
        self.birth = (_day("2015-07-01") - np.round(age_2015 * 365.25)).astype(np.int64)
        self.h = rng.standard_normal(n)

        # Main observation period.
        early = rng.random(n) < 0.05
        start = np.where(
            early,
            _day("2000-01-01") + rng.integers(0, 8 * 365, n),
            _day("2008-01-01") + rng.integers(0, 11 * 365, n),
        )
        length = 365 + np.minimum(np.floor(rng.gamma(1.3, 1100.0, n)), 11 * 365)
        self.obs_start = start.astype(np.int64)
        self.obs_end = np.minimum(start + length.astype(np.int64) - 1, _DATA_END)
        # An earlier period for ~2%: a 180-1,500 day period ending 30-700 days before.
        self.has_prior_period = rng.random(n) < 0.02
        gap = rng.integers(30, 700, n)
        p1_len = rng.integers(180, 1500, n)
        self.prior_end = np.where(self.has_prior_period, self.obs_start - gap, 0)
        self.prior_start = np.where(self.has_prior_period, self.prior_end - p1_len + 1, 0)

        # Users and index dates (a pseudo index for non-users anchors their history).
        self.user = rng.random(n) < _USER_SHARE
        span = self.obs_end - self.obs_start  # days after the first day
        short = span < 365 + 60
        early_start = short | (self.user & (rng.random(n) < _EARLY_START_SHARE))
        late = self.obs_start + 365 + np.floor(rng.beta(1.1, 1.8, n) * (span - 365 - 30))
        soon = self.obs_start + 30 + np.floor(rng.random(n) * np.minimum(335, span - 60))
        self.t0 = np.where(early_start, soon, late).astype(np.int64)
        self.age = (self.t0 - self.birth) / 365.25
        a = (self.age - 55.0) / 15.0

        # Indications.
        coef = _INDICATION_MODEL
        logits = coef[:, 0] + np.outer(a, coef[:, 1]) + np.outer(self.h, coef[:, 2])
        logits += np.outer(self.male, coef[:, 3])
        self.indications = rng.random((n, len(INDICATIONS))) < 1.0 / (1.0 + np.exp(-logits))
        self.x = np.column_stack([self.indications, a, self.male]).astype(np.float64)
        self.x_columns = np.ascontiguousarray(self.x.T)  # fast access to one covariate

        # Drug choice (Gumbel-max multinomial logit), -1 for non-users.
        scores = np.zeros((n, len(STUDY_DRUGS)))
        for j, drug in enumerate(TREATMENTS, start=1):
            intercept, effects = _CHOICE_MODEL[drug]
            scores[:, j] = intercept + self.x @ _columns(effects)
            scores[:, j] += unmeasured_confounding * _U_CHOICE[drug] * self.u
        scores += rng.gumbel(size=scores.shape)
        self.drug = np.where(self.user, np.argmax(scores, axis=1), -1)

    def uniform_observed_day(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A day drawn uniformly over all observation periods of persons ``idx``."""
        len_main = self.obs_end[idx] - self.obs_start[idx] + 1
        len_prior = np.where(
            self.has_prior_period[idx], self.prior_end[idx] - self.prior_start[idx] + 1, 0
        )
        u = np.floor(rng.random(idx.size) * (len_main + len_prior)).astype(np.int64)
        return np.where(
            u < len_prior, self.prior_start[idx] + u, self.obs_start[idx] + u - len_prior
        )

    def period_end(self, idx: np.ndarray, day: np.ndarray) -> np.ndarray:
        """The end of the observation period containing ``day`` (main period otherwise)."""
        in_prior = self.has_prior_period[idx] & (day <= self.prior_end[idx])
        return np.where(in_prior, self.prior_end[idx], self.obs_end[idx])


# ----------------------------------------------------------------------------- records
def _condition_end(start: np.ndarray, limit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.minimum(start + np.floor(rng.exponential(7.0, start.size)).astype(np.int64), limit)


def _indication_records(p: _Persons, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    pid, concept, start = [], [], []
    ids = np.array([DEMO_CONCEPTS[c] for c in INDICATIONS], dtype=np.int64)
    rows, k = np.nonzero(p.indications)
    # One record in the 365 days before t0 (clipped to the start of observation).
    first = np.maximum(p.t0[rows] - 1 - rng.integers(0, 365, rows.size), p.obs_start[rows])
    pid.append(rows)
    concept.append(ids[k])
    start.append(first)
    # Chronic repeats anywhere in observation.
    reps = rng.poisson(1.2, rows.size)
    r_rows, r_k = np.repeat(rows, reps), np.repeat(k, reps)
    pid.append(r_rows)
    concept.append(ids[r_k])
    start.append(p.uniform_observed_day(r_rows, rng))
    # An old, resolved record (> 365 days before t0) for a few persons without the indication.
    rows0, k0 = np.nonzero(~p.indications & (rng.random(p.indications.shape) < 0.03))
    room = p.t0[rows0] - 366 - p.obs_start[rows0]
    keep = room >= 0
    rows0, k0, room = rows0[keep], k0[keep], room[keep]
    pid.append(rows0)
    concept.append(ids[k0])
    start.append(p.obs_start[rows0] + np.floor(rng.random(rows0.size) * (room + 1)))
    pid_a = np.concatenate(pid)
    start_a = np.concatenate(start).astype(np.int64)
    end_a = _condition_end(start_a, p.period_end(pid_a, start_a), rng)
    return pid_a, np.concatenate(concept), start_a, end_a


def _outcome_records(
    p: _Persons, rng: np.random.Generator, effect_end: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """First events before ``t0`` (prior outcomes), first events after ``t0`` and some repeats.

    One Poisson process per person and outcome, observed from the start of the main period
    with day ``t0`` left out: a single Exp(1) draw gives the first event, and when that falls
    after ``t0`` its excess hazard (memoryless) gives the first event after ``t0``; persons
    with a prior event draw afresh for after ``t0``. ``effect_end`` (on-treatment mode: the
    last day the planted HR acts, per person) makes the hazard after ``t0`` piecewise
    constant, ``HR x base`` over days ``t0 + 1 .. effect_end`` and ``base`` after; None (ITT)
    applies the HR to the end of observation. Outcomes without a planted effect use the ITT
    formula in both modes (no effect, so the same model).
    """
    pid, concept, start = [], [], []
    span_before = (p.t0 - p.obs_start).astype(np.float64)  # days obs_start .. t0 - 1
    span_after = (p.obs_end - p.t0).astype(np.float64)  # days t0 + 1 .. obs_end
    drug = np.where(p.drug >= 0, p.drug, 0)  # non-users follow the comparator (HR 1)
    if effect_end is not None:  # days t0 + 1 .. effect_end, within observation
        span_on = np.clip(effect_end - p.t0, 0, p.obs_end - p.t0).astype(np.float64)
    for outcome, (base, gamma, effects) in _OUTCOME_MODEL.items():
        # Frailty exp(g u - g^2 / 2), mean 1: the average hazard is base at any strength.
        g = gamma * p.unmeasured_confounding
        rate = g * p.u + (math.log(base / 365.25) - 0.5 * g * g)  # log hazard per day
        coef = _columns(effects)
        for k in np.nonzero(coef)[0]:
            rate += coef[k] * p.x_columns[k]
        np.exp(rate, out=rate)
        hr = np.array([true_hr(d, outcome) for d in STUDY_DRUGS])
        rate_after = rate * hr[drug] if (hr != 1.0).any() else rate
        e = rng.standard_exponential(p.n)
        cum_before = rate * span_before
        before = np.nonzero(e < cum_before)[0]
        excess = e - cum_before  # Exp(1) given no event before t0
        excess[before] = rng.standard_exponential(before.size)
        day_before = p.obs_start[before] + np.floor(e[before] / rate[before]).astype(np.int64)
        if effect_end is None or rate_after is rate:
            after = np.nonzero(excess < rate_after * span_after)[0]
            offset = np.floor(excess[after] / rate_after[after])
        else:
            after, offset = _piecewise_first(excess, rate_after, rate, span_on, span_after)
        day_after = p.t0[after] + 1 + offset.astype(np.int64)
        repeat = day_after + 1 + np.floor(rng.exponential(180.0, after.size)).astype(np.int64)
        has_repeat = (rng.random(after.size) < _REPEAT_SHARE) & (repeat <= p.obs_end[after])
        rows = np.concatenate([before, after, after[has_repeat]])
        days = np.concatenate([day_before, day_after, repeat[has_repeat]])
        ids = np.full(rows.size, DEMO_CONCEPTS[outcome], dtype=np.int64)
        if outcome in OUTCOME_VARIANT_CONCEPTS:
            ids[rng.random(rows.size) < _VARIANT_SHARE] = OUTCOME_VARIANT_CONCEPTS[outcome]
        pid.append(rows)
        concept.append(ids)
        start.append(days)
    pid_a, start_a = np.concatenate(pid), np.concatenate(start)
    return pid_a, np.concatenate(concept), start_a, _condition_end(start_a, p.obs_end[pid_a], rng)


def _piecewise_first(
    excess: np.ndarray, rate_on: np.ndarray, rate_off: np.ndarray, span_on: np.ndarray,
    span: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Persons with a first event after ``t0`` and its day offset from ``t0 + 1``, for a
    hazard ``rate_on`` over the first ``span_on`` days and ``rate_off`` up to ``span`` days.

    ``excess`` is each person's Exp(1) cumulative-hazard budget: the event falls where the
    cumulative hazard reaches it (inverse of the piecewise-linear cumulative hazard).
    """
    cum_on = rate_on * span_on
    on = excess < cum_on
    rest = excess - cum_on
    after = np.nonzero(on | (rest < rate_off * (span - span_on)))[0]
    offset = np.where(on[after], np.floor(excess[after] / rate_on[after]),
                      span_on[after] + np.floor(rest[after] / rate_off[after]))
    return after, offset


def _noise_counts(p: _Persons, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Records per person: Poisson with a mean that rises with the latent health state."""
    return rng.poisson(mean * np.exp(0.3 * p.h - 0.045))


def _noise_records(
    p: _Persons, mean: float, concept_ids: np.ndarray, probs: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(p.n), _noise_counts(p, mean, rng))
    concept = concept_ids[_draw(rng, probs, rows.size)]
    return rows, concept, p.uniform_observed_day(rows, rng)


def _eras(
    rows: np.ndarray, ingredient: np.ndarray, products: np.ndarray, start: np.ndarray,
    limit: np.ndarray, rng: np.random.Generator, log_shift: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Eras of 30-day fills (occasionally 1-25 days apart) starting at ``start``, at most
    1,000 days, cut at ``limit`` (end of observation). Returns (eras, fills) as columns.
    ``log_shift`` (per era) moves the log mean of the number of fills (informative
    discontinuation); None leaves the draws exactly as they were."""
    log_fills = rng.normal(0.9, 1.0, rows.size)
    if log_shift is not None:
        log_fills += log_shift
    n_fills = np.clip(np.ceil(np.exp(log_fills)), 1, 33).astype(np.int64)
    era = np.repeat(np.arange(rows.size), n_fills)
    first = _segment_starts(n_fills)
    k = np.arange(era.size) - first[era]
    gap = np.where((k > 0) & (rng.random(era.size) < 0.25), rng.integers(1, 26, era.size), 0)
    cum_gap = np.cumsum(gap)
    cum_gap -= (cum_gap - gap)[first][era]  # cumulative gap within the era
    f_start = start[era] + 30 * k + cum_gap
    # Cut at the limit and at 1,000 days (the first fill of an era is always kept).
    keep = (f_start <= limit[era]) & (f_start <= start[era] + 1000 - 30)
    era, k, gap, f_start = era[keep], k[keep], gap[keep], f_start[keep]
    f_end = np.minimum(f_start + 29, limit[era])
    bounds = _segment_starts(np.bincount(era, minlength=rows.size))
    eras = {
        "person": rows,
        "concept": ingredient,
        "start": start,
        "end": np.maximum.reduceat(f_end, bounds) if era.size else f_end,
        "count": np.bincount(era, minlength=rows.size),
        "gap": np.add.reduceat(gap, bounds) if era.size else gap,
    }
    fills = {"person": rows[era], "concept": products[era], "start": f_start, "end": f_end}
    return eras, fills


def _study_drug_records(
    p: _Persons, rng: np.random.Generator, informative: bool = False,
) -> tuple[list, list]:
    """Study-drug eras and fills: [first eras, restarts, added treatments] of each.

    ``informative`` (on-treatment mode) shortens the first era of persons with a high ``u``.
    """
    ingredient = np.array([DEMO_CONCEPTS[d] for d in STUDY_DRUGS], dtype=np.int64)
    product = np.array([PRODUCT_CONCEPTS[d] for d in STUDY_DRUGS], dtype=np.int64)
    users = np.nonzero(p.drug >= 0)[0]

    def batch(rows: np.ndarray, drug: np.ndarray, start: np.ndarray,
              log_shift: np.ndarray | None = None) -> tuple[dict, dict]:
        second_product = rng.random(rows.size) < 0.35  # one product per era
        return _eras(rows, ingredient[drug], product[drug, second_product.astype(int)], start,
                     p.obs_end[rows], rng, log_shift)

    shift = None
    if informative:
        shift = -_DISCONTINUATION_U * p.unmeasured_confounding * p.u[users]
    first_eras, first_fills = batch(users, p.drug[users], p.t0[users], shift)
    eras, fills = [first_eras], [first_fills]
    # Restarts of the same drug after a gap.
    restart = first_eras["end"] + 61 + np.floor(rng.exponential(200.0, users.size))
    restart = restart.astype(np.int64)
    ok = (rng.random(users.size) < _RESTART_SHARE) & (restart <= p.obs_end[users])
    e, f = batch(users[ok], p.drug[users[ok]], restart[ok])
    eras.append(e)
    fills.append(f)
    # Second line: some comparator users (~5% of all users) later add a treatment. Their
    # hazard keeps following the comparator, and they are in both arms of that comparison
    # only, so no comparison vs comparator_drug is contaminated.
    switch = (p.drug[users] == 0) & (p.t0[users] - p.obs_start[users] >= 365)
    second = users[switch & (rng.random(users.size) < _SWITCH_SHARE)]
    other = rng.integers(1, len(STUDY_DRUGS), second.size)
    room = p.obs_end[second] - p.t0[second] - 30
    t2 = p.t0[second] + 30 + np.floor(rng.random(second.size) * np.maximum(room, 0))
    e, f = batch(second, other, t2.astype(np.int64))
    eras.append(e)
    fills.append(f)
    return eras, fills


def _effect_end(p: _Persons, first: dict, restart: dict) -> np.ndarray:
    """Per person, the last day the planted HR acts in on-treatment mode: the end of the first
    exposure episode plus the carry-over (``t0`` for non-users: never exposed).

    The episode is the first era, joined with the restart of the same drug when that begins at
    most ``_EPISODE_GAP_DAYS`` after it (as the engine joins records; restarts are drawn at
    least 61 days later, so today this never happens, but the rule stays right if they move).
    """
    end = p.t0.copy()
    end[first["person"]] = first["end"]
    joined = restart["start"] <= end[restart["person"]] + _EPISODE_GAP_DAYS
    end[restart["person"][joined]] = np.maximum(end[restart["person"][joined]],
                                                restart["end"][joined])
    users = first["person"]
    end[users] += _CARRY_OVER_DAYS
    return end


def _noise_drug_records(p: _Persons, rng: np.random.Generator) -> tuple[dict, dict]:
    rows = np.repeat(np.arange(p.n), _noise_counts(p, 2.5, rng))
    ing = _draw(rng, _zipf_probs(_N_NOISE_DRUGS, 1.1, 2.0), rows.size)
    pairs = np.unique(rows.astype(np.int64) * _N_NOISE_DRUGS + ing)  # one era per pair
    rows, ing = pairs // _N_NOISE_DRUGS, pairs % _N_NOISE_DRUGS
    span = p.obs_end[rows] - p.obs_start[rows] + 1
    start = p.obs_start[rows] + np.floor(rng.random(rows.size) * span).astype(np.int64)
    return _eras(rows, _NOISE_INGREDIENT_IDS[ing], _NOISE_PRODUCT_IDS[ing], start,
                 p.obs_end[rows], rng)


# ----------------------------------------------------------------------------- vocabulary
def _concept_rows() -> dict[str, list]:
    rows: list[tuple[int, str, str, str, str, str | None]] = [
        (0, "No matching concept", "Metadata", "None", "Undefined", None),
        (GENDER_MALE, "MALE", "Gender", "Gender", "Gender", "S"),
        (GENDER_FEMALE, "FEMALE", "Gender", "Gender", "Gender", "S"),
        (_TYPE_EHR, "EHR record (demo)", "Type Concept", DEMO_VOCABULARY_ID, "Type Concept", "S"),
        (_TYPE_PERIOD, "Period covering healthcare encounters (demo)", "Type Concept",
         DEMO_VOCABULARY_ID, "Type Concept", "S"),
    ]
    demo = DEMO_VOCABULARY_ID
    for d in STUDY_DRUGS:
        rows.append((DEMO_CONCEPTS[d], d, "Drug", demo, "Ingredient", "S"))
        for strength, cid in zip((10, 20), PRODUCT_CONCEPTS[d], strict=True):
            rows.append((cid, f"{d} {strength} MG Oral Tablet", "Drug", demo, "Clinical Drug",
                         "S"))
    for o in OUTCOMES:
        rows.append((DEMO_CONCEPTS[o], o, "Condition", demo, "Clinical Finding", "S"))
        rows.append((OUTCOME_VARIANT_CONCEPTS[o], f"{o}, variant", "Condition", demo,
                     "Clinical Finding", "S"))
    for c in (*NEGATIVE_CONTROLS, *INDICATIONS):
        rows.append((DEMO_CONCEPTS[c], c, "Condition", demo, "Clinical Finding", "S"))
    for i in range(_N_NOISE_CONDITIONS):
        rows.append((int(_NOISE_CONDITION_IDS[i]), f"condition_{i + 1:03d}", "Condition", demo,
                     "Clinical Finding", "S"))
    for i in range(_N_NOISE_DRUGS):
        rows.append((int(_NOISE_INGREDIENT_IDS[i]), f"ingredient_{i + 1:02d}", "Drug", demo,
                     "Ingredient", "S"))
        rows.append((int(_NOISE_PRODUCT_IDS[i]), f"ingredient_{i + 1:02d} 5 MG Oral Tablet",
                     "Drug", demo, "Clinical Drug", "S"))
    for i in range(_N_PROCEDURES):
        rows.append((int(_PROCEDURE_IDS[i]), f"procedure_{i + 1:03d}", "Procedure", demo,
                     "Procedure", "S"))
    for i in range(_N_MEASUREMENTS):
        rows.append((int(_MEASUREMENT_IDS[i]), f"measurement_{i + 1:02d}", "Measurement", demo,
                     "Lab Test", "S"))
    cols = list(zip(*rows, strict=True))
    codes = [
        "No matching concept" if cid == 0 else ("M" if cid == GENDER_MALE else "F")
        if cid in (GENDER_MALE, GENDER_FEMALE) else f"CF{cid - _BASE:07d}"
        for cid in cols[0]
    ]
    return {
        "concept_id": list(cols[0]), "concept_name": list(cols[1]), "domain_id": list(cols[2]),
        "vocabulary_id": list(cols[3]), "concept_class_id": list(cols[4]),
        "standard_concept": list(cols[5]), "concept_code": codes,
    }


def _ancestor_rows(concept: dict[str, list]) -> dict[str, np.ndarray]:
    standard = [c for c, s in zip(concept["concept_id"], concept["standard_concept"],
                                  strict=True) if s == "S"]
    pairs = [(c, c, 0) for c in standard]
    for d in STUDY_DRUGS:
        pairs += [(DEMO_CONCEPTS[d], prod, 1) for prod in PRODUCT_CONCEPTS[d]]
    pairs += [(DEMO_CONCEPTS[o], OUTCOME_VARIANT_CONCEPTS[o], 1) for o in OUTCOMES]
    pairs += [(int(i), int(prod), 1)
              for i, prod in zip(_NOISE_INGREDIENT_IDS, _NOISE_PRODUCT_IDS, strict=True)]
    arr = np.array(pairs, dtype=np.int64)
    return {"ancestor_concept_id": arr[:, 0], "descendant_concept_id": arr[:, 1],
            "min_levels_of_separation": arr[:, 2], "max_levels_of_separation": arr[:, 2]}


# ----------------------------------------------------------------------------- main
def generate_demo_cdm(
    out_dir: Path, *, persons: int = 50_000, seed: int = 0, unmeasured_confounding: float = 1.0,
    exposure_effect: ExposureEffect = "itt",
) -> Path:
    """Write a synthetic OMOP CDM v5.3 (``<table>.parquet`` per table) and ``truth.csv``.

    ``out_dir`` is created if needed; only the files named in ``CDM_SCHEMA`` and
    ``truth.csv`` are (over)written. The data are a deterministic function of
    ``persons``, ``seed`` and ``unmeasured_confounding`` (the strength ``s`` of the unrecorded
    confounder ``u``, see the module docstring: 0 turns it off, its coefficients scale with
    ``s``) and ``exposure_effect`` (``"itt"``: the planted HRs act from the day after ``t0``
    to the end of observation; ``"on_treatment"``: only through the first exposure episode plus
    30 days, see the module docstring). Returns the path of ``truth.csv``.
    """
    if persons < 1:
        raise ValueError("persons must be >= 1")
    if not (math.isfinite(unmeasured_confounding) and unmeasured_confounding >= 0):
        raise ValueError("unmeasured_confounding must be a finite number >= 0")
    if exposure_effect not in EXPOSURE_EFFECTS:
        raise ValueError(f"exposure_effect must be one of {EXPOSURE_EFFECTS}, "
                         f"not {exposure_effect!r}")
    on_treatment = exposure_effect == "on_treatment"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = _Persons(persons, seed, float(unmeasured_confounding))
    pid = p.person_id

    _write_person(out_dir, pid, p.male, p.birth)

    # observation_period: main periods, earlier periods, orphans (person ids with no person)
    rng = _rng(seed, 2)
    prior = np.nonzero(p.has_prior_period)[0]
    n_orphans = max(1, persons // 200)
    orphan_start = _day("2008-01-01") + rng.integers(0, 10 * 365, n_orphans)
    orphan_end = np.minimum(orphan_start + rng.integers(365, 8 * 365, n_orphans), _DATA_END)
    op_person = np.concatenate([pid, pid[prior], persons + 1 + np.arange(n_orphans)])
    op_start = np.concatenate([p.obs_start, p.prior_start[prior], orphan_start])
    op_end = np.concatenate([p.obs_end, p.prior_end[prior], orphan_end])
    _write_observation_periods(out_dir, op_person, op_start, op_end)

    # Study-drug eras first (their own stream, so the order changes nothing): in on-treatment
    # mode the outcome hazard follows the first exposure episode.
    eras, fills = _study_drug_records(p, _rng(seed, 5), informative=on_treatment)
    effect_end = _effect_end(p, eras[0], eras[1]) if on_treatment else None

    # condition_occurrence: indications, outcomes, noise (+ a little dirt after observation)
    rng = _rng(seed, 3)
    ind = _indication_records(p, rng)
    out = _outcome_records(p, _rng(seed, 4), effect_end)
    n_rows, n_concept, n_start = _noise_records(
        p, 10.0, _NOISE_CONDITION_IDS, _zipf_probs(_N_NOISE_CONDITIONS, 1.1, 3.0), rng)
    n_end = _condition_end(n_start, p.period_end(n_rows, n_start), rng)
    dirt = rng.random(n_rows.size) < 0.001
    n_start[dirt] = p.obs_end[n_rows[dirt]] + rng.integers(1, 181, int(dirt.sum()))
    n_end[dirt] = n_start[dirt]
    _write_conditions(out_dir, pid, np.concatenate([ind[0], out[0], n_rows]),
                      np.concatenate([ind[1], out[1], n_concept]),
                      np.concatenate([ind[2], out[2], n_start]),
                      np.concatenate([ind[3], out[3], n_end]))
    del ind, out, n_rows, n_concept, n_start, n_end

    # drug_era + drug_exposure: study drugs and noise ingredients
    e, f = _noise_drug_records(p, _rng(seed, 6))
    eras.append(e)
    fills.append(f)
    _write_drug_records(out_dir, pid,
                        {k: np.concatenate([x[k] for x in eras]) for k in eras[0]},
                        {k: np.concatenate([x[k] for x in fills]) for k in fills[0]})
    del eras, fills, e, f

    # procedure_occurrence, measurement
    rng = _rng(seed, 7)
    rows, concept, day = _noise_records(
        p, 4.0, _PROCEDURE_IDS, _zipf_probs(_N_PROCEDURES, 1.2, 2.0), rng)
    _write_procedures(out_dir, pid, rows, concept, day)
    rng = _rng(seed, 8)
    rows, m, day = _noise_records(
        p, 5.0, np.arange(_N_MEASUREMENTS), _zipf_probs(_N_MEASUREMENTS, 0.8, 2.0), rng)
    mean = 1.0 + 199.0 * _rng(seed, 9).random(_N_MEASUREMENTS)  # fixed per concept
    value = np.round(mean[m] * (1.0 + 0.15 * rng.standard_normal(rows.size)), 1)
    value[m % 4 == 3] = np.nan  # a quarter of the tests report no number
    _write(out_dir, "measurement", _arrow("measurement", rows.size, {
        "measurement_id": np.arange(1, rows.size + 1, dtype=np.int64),
        "person_id": pid[rows],
        "measurement_concept_id": _MEASUREMENT_IDS[m],
        "measurement_date": day,
        "measurement_type_concept_id": _TYPE_EHR,
        "value_as_number": value,
    }))
    del rows, m, day, value

    for empty in ("observation", "death", "visit_occurrence", "concept_relationship"):
        _write(out_dir, empty, _arrow(empty, 0, {}))

    # vocabulary tables
    concept = _concept_rows()
    _write_vocabulary(out_dir, concept, _ancestor_rows(concept), [
        (DEMO_VOCABULARY_ID, "Cohortflow synthetic demo vocabulary", "cohort/synthetic.py", "1"),
        ("Gender", "OMOP Gender", "OMOP generated", None),
        ("None", "OMOP Standardized Vocabularies", "OMOP generated", None),
    ], (
        "Cohortflow synthetic demo CDM", "cohortflow_demo",
        f"Synthetic data with planted effects: {persons} persons, seed {seed}, unmeasured "
        f"confounding {p.unmeasured_confounding:g}"
        + (", on-treatment effects" if on_treatment else "") + "; see truth.csv",
        "cohort/synthetic.py", "cohort.synthetic.generate_demo_cdm", "2021-01-01",
        f"{DEMO_VOCABULARY_ID} 1"))

    return _write_csv(out_dir / "truth.csv", [
        "treatment", "treatment_concept_id", "comparator", "comparator_concept_id", "outcome",
        "outcome_concept_id", "role", "true_hr",
    ], ([t, DEMO_CONCEPTS[t], COMPARATOR, DEMO_CONCEPTS[COMPARATOR], o, DEMO_CONCEPTS[o],
         "outcome" if o in OUTCOMES else "negative_control", true_hr(t, o)]
        for t in TREATMENTS for o in (*OUTCOMES, *NEGATIVE_CONTROLS)))
