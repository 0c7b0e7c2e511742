"""A synthetic OMOP CDM v5.3 for drug-repurposing screens, with planted, known hazard ratios.

The product screens every ingredient taken by patients with a disease D for an effect on D's
progression, emulating batteries of new-user trials per candidate against random other drugs
and against drugs of the same ATC class (Zang et al. 2023, Nat Commun: mild cognitive
impairment -> dementia; Ozery-Flato et al. 2020). This simulator plants the answer.

Causal model (log-linear effects; ``a`` = (age at D - 70) / 10, ``male`` 0/1, ``h`` ~ N(0, 1)
a latent frailty recorded in no table):

* Persons: sex (46% male), one observation period (starting 2006-2013, 3-14 years, ending by
  2022-12-31). 85% have D ("Mild cognitive impairment") with a first diagnosis ``d`` at
  >= 365 days of observation (94%; the others in their first year), age at ``d`` 47-90 (~2%
  under 50), and Poisson(2) repeat records of D after ``d``. Persons without D get a pseudo
  date ``d`` (used for their age only).
* ATC: 10 real ATC 2nd-level classes (A02, A10, C07, C08, C09, C10, M01, N05, N06, R03) under
  their real 1st levels (A, C, M, N, R), each split into 1-2 real 3rd levels (e.g. C09A ACE
  inhibitors, C09C ARBs), 5 invented ingredients per 2nd-level class (``drug_<class>_<j>``,
  e.g. ``drug_c10_3``: synthetic names and concept ids, no claim about any real drug). Each
  class ``k`` has its own indication ``I_k`` (a condition, named after a typical indication),
  a person-level trait present from the start with
  ``P(I_k) = logit^-1(alpha_k + age_k a + male_k male + frail_k h)`` (prevalence 12-26%).
  Carriers are recorded (a record in the 365 days before their first start of a class-k drug,
  or anywhere in observation for carriers who never start one, plus Poisson(0.8) repeats) with
  probability 95%, except M01's indication (the decoy's): 40%; unrecorded carriers have no
  record of it at all.
* Drug starts: each person starts a class-``k`` drug with probability ``logit^-1(-2.9 + 2.9 I_k +
  0.25 h + 0.1 a)`` (~50% of carriers, ~5% of others: off-label), independently by class (persons
  use 0-10 distinct ingredients, mean ~1.6; 73% at least one, 45% two or more). The ingredient
  inside the class is a multinomial logit on fixed shares (26/22/20/17/15%) with small age and sex
  effects (measured, so same-class comparisons are confounded only by measured covariates). For
  persons with D, 75% of starts fall after ``d`` (uniform-ish over the rest of observation,
  earlier more likely) and 25% before; persons without D start anywhere in observation. 20% of
  class starters later switch to another ingredient of the same class (1-91 days after their first
  era ends); 20% of those first and switch eras are followed by a restart of the same ingredient
  61+ days after they end. Eras are 30-day fills (``cohort.synthetic._eras``: 30-1,000 days,
  median ~90), written to ``drug_era`` and, one row per fill at the ingredient concept, to
  ``drug_exposure``.
* Progression outcome ("Dementia"): one first event per person from a proportional-hazards
  model with baseline ``0.05`` per person-year for a reference person (age 70, ``h`` = 0,
  female, no indication) times ``exp(0.55 a + 0.3 h - 0.1 male + sum_k gamma_k I_k)``, over
  days ``d + 1`` to the end of observation for persons with D (10% of that hazard over the
  whole observation for persons without D). ``gamma_k`` (the indications' effects, on the
  true, partly unrecorded ``I_k``): A02 0, A10 +0.35, C07 +0.25, C08 +0.15, C09 +0.3,
  C10 +0.1, M01 -1.0, N05 +0.4, N06 +0.5, R03 +0.2. Planted drug effects multiply the hazard
  from the day after a person's first start of the ingredient to the end of observation
  (intention to treat; several planted drugs multiply): ``drug_c10_3`` 0.5 and ``drug_a10_2``
  0.7 (protective), ``drug_n05_4`` 1.5 and ``drug_r03_1`` 2.0 (harmful); every other
  ingredient 1. The event is drawn by inverting the piecewise-constant cumulative hazard
  (vectorised over persons, one pass per change point rank). Repeats: Poisson(1.5) records
  after the first event. 2% of persons with D have a dementia record before ``d`` (prevalent
  cases, for exclude-prior-outcome rules) and no incident event.
* The decoy: ``drug_m01_2`` has HR 1, but M01's indication lowers the outcome's hazard
  (``gamma`` -1.0), is less common in frail persons, and is recorded for only 40% of its
  carriers. M01 users carry it far more often than users of other classes, so against random
  other drugs the decoy looks protective even after adjusting for the recorded indication;
  against its own class (which shares the indication) it does not.
* Confounding by indication: random-drug comparators differ in ``I_k`` (known to the outcome)
  and in ``h`` (frailer persons start more drugs and progress faster; noise-record counts
  rise with ``h``, a partial proxy); same-class comparators share the indication.
* Negative controls (25 condition concepts, ``nc_01``..``nc_25``): HR 1 for every drug,
  recurrent events from a Poisson process over the whole observation with rate
  ``base * exp(effects)``; 20 depend on indications (three on M01's, negatively, like the
  outcome), age, sex or ``h``; 5 on nothing.
* Noise: 300 condition and 100 procedure concepts with Zipf-like frequencies, counts rising
  with ``h``; one outpatient visit (``visit_occurrence``, concept 9202) per person-day with a
  condition or procedure record; ``death`` for ~4% of persons (more likely when old, frail or
  demented) on their last day of observation. measurement, observation and
  concept_relationship are written empty with their v5.3 columns.

What analyses see (300,000 persons, seed 0; new users after the first D with 365 days of
prior observation and age >= 50; Poisson rate ratios adjusted for age, sex and the indications
recorded in the year before start): same-class comparisons give 0.52 (planted 0.5), 0.74
(0.7), 1.46 (1.5), 1.71 (2.0) and 1.04 for the decoy; against users of other classes the
decoy gives 0.73 (crude ~0.5). The planted HRs are conditional hazard multipliers: marginal
ITT estimates sit a little closer to 1 (unmeasured frailty and indications make the HR
non-collapsible, and some comparator users start the candidate later). At 60,000 persons each
planted drug has ~900-1,450 such new users (every ingredient >= ~600).

Vocabulary: ``concept`` holds every concept used (invented ids >= 2,000,100,000, in the local
range OMOP reserves; the type concepts are the demo simulator's, 2,000,009,001-2; gender
8507/8532 and visit 9202 are the real OMOP ids). Ingredients are
vocabulary 'RxNorm', class 'Ingredient', standard 'S', domain 'Drug'; ATC classes are
vocabulary 'ATC', class 'ATC 1st'/'ATC 2nd'/'ATC 3rd', standard 'C', domain 'Drug',
concept_code the real ATC code. ``concept_ancestor`` has a self row for every standard or
classification concept and every ancestor pair with its levels: 1st -> 2nd -> 3rd ->
ingredient one level each (so 2nd -> ingredient 2 levels, 1st -> ingredient 3).

``python -m cohort.synthetic_screen --persons N --seed S --out DIR`` writes one without the
``cohortflow`` CLI and prints its size, time and peak memory.

``generate_screen_cdm`` is vectorised (numpy, pyarrow; loops run over classes, outcomes and
change-point ranks, never persons), deterministic in (persons, seed), and writes ``truth.csv``
with one row per ingredient and outcome (progression outcome and negative controls).
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cohort.synthetic import (
    _BASE,
    _FAR_PAST,
    _TYPE_EHR,
    _TYPE_PERIOD,
    GENDER_FEMALE,
    GENDER_MALE,
    _arrow,
    _condition_end,
    _day,
    _eras,
    _noise_records,
    _person_order,
    _rng,
    _write,
    _write_conditions,
    _write_csv,
    _write_drug_records,
    _write_observation_periods,
    _write_person,
    _write_procedures,
    _write_vocabulary,
    _zipf_probs,
)

__all__ = [
    "SCREEN_ATC_CLASSES",
    "SCREEN_ATC_FIRST_LEVELS",
    "SCREEN_ATC_THIRD_LEVELS",
    "SCREEN_CLASS_OF",
    "SCREEN_CONCEPTS",
    "SCREEN_DECOY",
    "SCREEN_DISEASE",
    "SCREEN_DISEASE_CONCEPT",
    "SCREEN_GENERATOR_VERSION",
    "SCREEN_INDICATIONS",
    "SCREEN_INGREDIENTS",
    "SCREEN_KIND",
    "SCREEN_NEGATIVE_CONTROLS",
    "SCREEN_OUTCOME",
    "SCREEN_OUTCOME_CONCEPT",
    "SCREEN_PLANTED",
    "SCREEN_THIRD_LEVEL_OF",
    "SCREEN_TRUE_HR",
    "SCREEN_VOCABULARY_ID",
    "generate_screen_cdm",
]

# ----------------------------------------------------------------------------- concepts
SCREEN_GENERATOR_VERSION = 1
"""Bumped whenever the same persons and seed would produce different data (caches check it)."""
SCREEN_VOCABULARY_ID = "Cohortflow Screen"
_SB = _BASE + 100_000  # this simulator's invented concept ids (OMOP's local range, >= 2e9)
_VISIT_OUTPATIENT = 9202  # the real OMOP "Outpatient Visit"
_END = _day("2022-12-31")

SCREEN_DISEASE = "mild_cognitive_impairment"
SCREEN_DISEASE_CONCEPT = _SB + 1
SCREEN_OUTCOME = "dementia"
SCREEN_OUTCOME_CONCEPT = _SB + 2

SCREEN_ATC_FIRST_LEVELS: dict[str, tuple[int, str]] = {
    code: (_SB + 1001 + i, name) for i, (code, name) in enumerate((
        ("A", "ALIMENTARY TRACT AND METABOLISM"),
        ("C", "CARDIOVASCULAR SYSTEM"),
        ("M", "MUSCULO-SKELETAL SYSTEM"),
        ("N", "NERVOUS SYSTEM"),
        ("R", "RESPIRATORY SYSTEM"),
    ))
}
"""ATC 1st-level code -> (concept id, name)."""

# ATC 2nd-level class: (name, indication, indication prevalence model (intercept, age, male,
# frailty h) on the logit scale, log HR of the indication on the outcome, share of carriers
# recorded).
_CLASS_MODEL: dict[str, tuple[str, str, tuple[float, float, float, float], float, float]] = {
    "A02": ("DRUGS FOR ACID RELATED DISORDERS", "Gastro-oesophageal reflux disease",
            (-1.3, 0.2, 0.0, 0.4), 0.0, 0.95),
    "A10": ("DRUGS USED IN DIABETES", "Type 2 diabetes mellitus",
            (-1.5, 0.2, 0.2, 0.4), 0.35, 0.95),
    "C07": ("BETA BLOCKING AGENTS", "Atrial fibrillation", (-2.0, 0.6, 0.3, 0.4), 0.25, 0.95),
    "C08": ("CALCIUM CHANNEL BLOCKERS", "Essential hypertension",
            (-1.1, 0.4, 0.0, 0.3), 0.15, 0.95),
    "C09": ("AGENTS ACTING ON THE RENIN-ANGIOTENSIN SYSTEM", "Heart failure",
            (-2.0, 0.6, 0.2, 0.5), 0.3, 0.95),
    "C10": ("LIPID MODIFYING AGENTS", "Hyperlipidaemia", (-1.0, 0.2, 0.1, 0.2), 0.1, 0.95),
    "M01": ("ANTIINFLAMMATORY AND ANTIRHEUMATIC PRODUCTS", "Osteoarthritis",
            (-1.1, 0.2, -0.3, -0.3), -1.0, 0.4),
    "N05": ("PSYCHOLEPTICS", "Insomnia", (-1.6, 0.2, -0.2, 0.5), 0.4, 0.95),
    "N06": ("PSYCHOANALEPTICS", "Depressive disorder", (-1.6, 0.0, -0.4, 0.5), 0.5, 0.95),
    "R03": ("DRUGS FOR OBSTRUCTIVE AIRWAY DISEASES", "Chronic obstructive lung disease",
            (-2.0, 0.3, 0.2, 0.5), 0.2, 0.95),
}
_CLASSES = tuple(_CLASS_MODEL)
_PER_CLASS = 5
SCREEN_ATC_CLASSES: dict[str, int] = {c: _SB + 1101 + i for i, c in enumerate(_CLASSES)}
"""ATC 2nd-level code -> concept id."""
# ATC 3rd levels of each class: (code, name, how many of the class's ingredients, in order).
_THIRD_LEVELS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "A02": (("A02B", "DRUGS FOR PEPTIC ULCER AND GASTRO-OESOPHAGEAL REFLUX DISEASE (GORD)", 5),),
    "A10": (("A10B", "BLOOD GLUCOSE LOWERING DRUGS, EXCL. INSULINS", 4),
            ("A10A", "INSULINS AND ANALOGUES", 1)),
    "C07": (("C07A", "BETA BLOCKING AGENTS", 5),),
    "C08": (("C08C", "SELECTIVE CALCIUM CHANNEL BLOCKERS WITH MAINLY VASCULAR EFFECTS", 3),
            ("C08D", "SELECTIVE CALCIUM CHANNEL BLOCKERS WITH DIRECT CARDIAC EFFECTS", 2)),
    "C09": (("C09A", "ACE INHIBITORS, PLAIN", 3),
            ("C09C", "ANGIOTENSIN II RECEPTOR BLOCKERS (ARBs), PLAIN", 2)),
    "C10": (("C10A", "LIPID MODIFYING AGENTS, PLAIN", 5),),
    "M01": (("M01A", "ANTIINFLAMMATORY AND ANTIRHEUMATIC PRODUCTS, NON-STEROIDS", 5),),
    "N05": (("N05A", "ANTIPSYCHOTICS", 2), ("N05C", "HYPNOTICS AND SEDATIVES", 3)),
    "N06": (("N06A", "ANTIDEPRESSANTS", 5),),
    "R03": (("R03A", "ADRENERGICS, INHALANTS", 3),
            ("R03B", "OTHER DRUGS FOR OBSTRUCTIVE AIRWAY DISEASES, INHALANTS", 2)),
}
SCREEN_ATC_THIRD_LEVELS: dict[str, int] = {
    code: _SB + 1201 + i for i, (code, _, _) in enumerate(
        t for c in _CLASSES for t in _THIRD_LEVELS[c])
}
"""ATC 3rd-level code -> concept id."""
SCREEN_INDICATIONS: dict[str, int] = {c: _SB + 3001 + i for i, c in enumerate(_CLASSES)}
"""ATC 2nd-level code -> concept id of its class's indication (a condition)."""
SCREEN_INGREDIENTS: dict[str, int] = {
    f"drug_{c.lower()}_{j + 1}": _SB + 2001 + 10 * i + j
    for i, c in enumerate(_CLASSES) for j in range(_PER_CLASS)
}
"""Ingredient name -> concept id (50 ingredients, class by class)."""
SCREEN_CLASS_OF: dict[str, str] = {
    f"drug_{c.lower()}_{j + 1}": c for c in _CLASSES for j in range(_PER_CLASS)
}
"""Ingredient name -> its ATC 2nd-level code."""
SCREEN_THIRD_LEVEL_OF: dict[str, str] = {
    f"drug_{c.lower()}_{j + 1}": code for c in _CLASSES
    for code, j in zip([t[0] for t in _THIRD_LEVELS[c] for _ in range(t[2])], range(_PER_CLASS),
                       strict=True)
}
"""Ingredient name -> its ATC 3rd-level code."""

SCREEN_PLANTED: dict[str, tuple[float, str]] = {
    "drug_c10_3": (0.5, "protective"),
    "drug_a10_2": (0.7, "protective"),
    "drug_n05_4": (1.5, "harmful"),
    "drug_r03_1": (2.0, "harmful"),
    "drug_m01_2": (1.0, "decoy"),
}
"""Ingredient -> (planted HR on the outcome, kind); every other ingredient: (1.0, "null")."""
SCREEN_DECOY = "drug_m01_2"
SCREEN_TRUE_HR: dict[str, float] = {
    d: SCREEN_PLANTED.get(d, (1.0, "null"))[0] for d in SCREEN_INGREDIENTS
}
"""Ingredient -> planted HR on the progression outcome (every negative control: 1)."""
SCREEN_KIND: dict[str, str] = {
    d: SCREEN_PLANTED.get(d, (1.0, "null"))[1] for d in SCREEN_INGREDIENTS
}
"""Ingredient -> protective | harmful | null | decoy."""

# Negative controls: (events per person-year for a reference person, log HRs on the class
# indications (by ATC code), "age" (per 10 years), "male", "frailty" (h)).
_NC_MODEL: dict[str, tuple[float, dict[str, float]]] = {
    "nc_01": (0.010, {"A10": 0.6, "age": 0.3}),
    "nc_02": (0.008, {"C07": 0.5, "C09": 0.4}),
    "nc_03": (0.012, {"M01": -0.6}),
    "nc_04": (0.010, {"M01": -0.5, "age": 0.2}),
    "nc_05": (0.009, {"N05": 0.6, "frailty": 0.3}),
    "nc_06": (0.010, {"N06": 0.7}),
    "nc_07": (0.008, {"R03": 0.6, "male": 0.3}),
    "nc_08": (0.012, {"age": 0.5}),
    "nc_09": (0.010, {"male": 0.5}),
    "nc_10": (0.010, {"frailty": 0.5}),
    "nc_11": (0.009, {"C08": 0.5, "age": 0.3}),
    "nc_12": (0.008, {"C10": 0.5}),
    "nc_13": (0.010, {"A02": 0.6}),
    "nc_14": (0.011, {"frailty": 0.4, "age": 0.3}),
    "nc_15": (0.009, {"A10": 0.4, "C09": 0.4}),
    "nc_16": (0.010, {"N06": 0.5, "male": -0.4}),
    "nc_17": (0.008, {"M01": -0.4, "frailty": 0.3}),
    "nc_18": (0.010, {"C07": 0.5, "age": 0.4}),
    "nc_19": (0.009, {"A02": 0.4, "N05": 0.4}),
    "nc_20": (0.010, {"frailty": 0.6}),
    "nc_21": (0.010, {}),
    "nc_22": (0.008, {}),
    "nc_23": (0.012, {}),
    "nc_24": (0.009, {}),
    "nc_25": (0.010, {}),
}
SCREEN_NEGATIVE_CONTROLS: dict[str, int] = {
    nc: _SB + 4001 + i for i, nc in enumerate(_NC_MODEL)
}
"""Negative-control outcome name -> condition concept id (HR 1 for every ingredient)."""

SCREEN_CONCEPTS: dict[str, int] = {
    SCREEN_DISEASE: SCREEN_DISEASE_CONCEPT,
    SCREEN_OUTCOME: SCREEN_OUTCOME_CONCEPT,
    **SCREEN_INGREDIENTS,
    **{f"atc_{c.lower()}": cid for c, cid in SCREEN_ATC_CLASSES.items()},
    **{f"atc_{c.lower()}": cid for c, cid in SCREEN_ATC_THIRD_LEVELS.items()},
    **{f"indication_{c.lower()}": cid for c, cid in SCREEN_INDICATIONS.items()},
    **SCREEN_NEGATIVE_CONTROLS,
}
"""Every named concept a study file may need -> concept id."""

_N_NOISE_CONDITIONS, _N_PROCEDURES = 300, 100
_NOISE_CONDITION_IDS = _SB + 5001 + np.arange(_N_NOISE_CONDITIONS, dtype=np.int64)
_PROCEDURE_IDS = _SB + 6001 + np.arange(_N_PROCEDURES, dtype=np.int64)

# Outcome model: baseline per person-year (reference person), log HRs of a, h, male; the
# hazard share of persons without D.
_OUTCOME_BASE, _OUTCOME_AGE, _OUTCOME_FRAILTY, _OUTCOME_MALE = 0.05, 0.55, 0.3, -0.1
_NO_DISEASE_SHARE = 0.1
# Drug use: start log-odds (intercept, indication, h, a); ingredient shares inside a class
# and their (age, male) log-odds effects; after-D share, switch and restart shares.
_START_MODEL = (-2.9, 2.9, 0.25, 0.1)
_SHARES = np.array([0.26, 0.22, 0.20, 0.17, 0.15])
_CHOICE_AGE = np.array([0.0, 0.15, -0.15, 0.1, -0.1])
_CHOICE_MALE = np.array([0.0, -0.1, 0.1, 0.2, -0.2])
_AFTER_SHARE, _SWITCH_SHARE, _RESTART_SHARE = 0.75, 0.20, 0.20


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- persons
class _ScreenPersons:
    """Person-level arrays (index i = person_id - 1). Offers ``n``, ``h`` and
    ``uniform_observed_day``, what ``cohort.synthetic._noise_records`` reads."""

    def __init__(self, n: int, seed: int) -> None:
        rng = _rng(seed, 101)
        self.n = n
        self.person_id = np.arange(1, n + 1, dtype=np.int64)
        self.male = rng.random(n) < 0.46
        self.h = rng.standard_normal(n)
        self.obs_start = _day("2006-01-01") + rng.integers(0, 8 * 365, n)
        length = 3 * 365 + np.minimum(np.floor(rng.gamma(1.4, 1000.0, n)), 11 * 365)
        self.obs_end = np.minimum(self.obs_start + length.astype(np.int64) - 1, _END)
        span = self.obs_end - self.obs_start  # >= 3 * 365 - 1
        self.has_d = rng.random(n) < 0.85
        early = rng.random(n) < 0.06
        late = self.obs_start + 365 + np.floor(rng.beta(1.2, 2.0, n) * (span - 545))
        soon = self.obs_start + np.floor(rng.random(n) * 365)
        self.d0 = np.where(early, soon, late).astype(np.int64)
        age = 47.0 + 43.0 * rng.beta(2.0, 2.6, n)
        self.birth = self.d0 - np.round(age * 365.25).astype(np.int64)
        self.a = (age - 70.0) / 10.0
        # Class indications (true carrier status) and whether a carrier is recorded.
        coef = np.array([m[2] for m in _CLASS_MODEL.values()])
        logits = (coef[:, 0] + np.outer(self.a, coef[:, 1]) + np.outer(self.male, coef[:, 2])
                  + np.outer(self.h, coef[:, 3]))
        self.ind = rng.random(logits.shape) < _sigmoid(logits)
        recorded = np.array([m[4] for m in _CLASS_MODEL.values()])
        self.ind_recorded = self.ind & (rng.random(logits.shape) < recorded)
        self.demented = np.zeros(n, dtype=bool)  # any dementia record (set with the outcome)

    def uniform_observed_day(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A day drawn uniformly over the observation period of persons ``idx``."""
        span = self.obs_end[idx] - self.obs_start[idx] + 1
        return self.obs_start[idx] + np.floor(rng.random(idx.size) * span).astype(np.int64)

    def days_after(self, idx: np.ndarray, after: np.ndarray, mean_count: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Poisson(``mean_count``) repeat days per row, uniform over ``after + 1`` to the end
        of observation (rows with no room get none). Returns (row index, day)."""
        room = self.obs_end[idx] - after
        counts = np.where(room > 0, rng.poisson(mean_count, idx.size), 0)
        rows = np.repeat(np.arange(idx.size), counts)
        day = after[rows] + 1 + np.floor(rng.random(rows.size) * room[rows]).astype(np.int64)
        return rows, day


# ----------------------------------------------------------------------------- drugs
def _drug_starts(p: _ScreenPersons, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """First starts of each class a person uses: person, class, ingredient index (0-49), day."""
    b0, b_ind, b_h, b_a = _START_MODEL
    start_p = _sigmoid(b0 + b_ind * p.ind + b_h * p.h[:, None] + b_a * p.a[:, None])
    rows, k = np.nonzero(rng.random(start_p.shape) < start_p)
    del start_p
    scores = (np.log(_SHARES) + np.outer(p.a[rows], _CHOICE_AGE)
              + np.outer(p.male[rows], _CHOICE_MALE) + rng.gumbel(size=(rows.size, _PER_CLASS)))
    j = np.argmax(scores, axis=1)
    del scores
    d0, start, end = p.d0[rows], p.obs_start[rows], p.obs_end[rows]
    after = p.has_d[rows] & (rng.random(rows.size) < _AFTER_SHARE)
    day_after = d0 + 1 + np.floor(rng.beta(1.0, 1.8, rows.size) * (end - d0 - 1))
    day_before = start + np.floor(rng.random(rows.size) * (d0 - start))
    day_any = start + np.floor(rng.random(rows.size) * (end - start + 1))
    day = np.where(after, day_after, np.where(p.has_d[rows], day_before, day_any))
    return {"person": rows, "cls": k, "ing": k * _PER_CLASS + j, "start": day.astype(np.int64)}


def _drug_records(
    p: _ScreenPersons, first: dict[str, np.ndarray], rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Eras and fills of first starts, same-class switches and restarts; and the first starts
    of every (person, ingredient) as (person, ing, start)."""
    ids = np.array(list(SCREEN_INGREDIENTS.values()), dtype=np.int64)

    def eras(rows: np.ndarray, ing: np.ndarray, start: np.ndarray) -> tuple[dict, dict]:
        return _eras(rows, ids[ing], ids[ing], start, p.obs_end[rows], rng)

    e1, f1 = eras(first["person"], first["ing"], first["start"])
    # Switch to another ingredient of the same class after the first era.
    rows = first["person"]
    start2 = e1["end"] + 1 + rng.integers(0, 91, rows.size)
    sw = (rng.random(rows.size) < _SWITCH_SHARE) & (start2 <= p.obs_end[rows])
    other = (first["ing"][sw] % _PER_CLASS + 1 + rng.integers(0, _PER_CLASS - 1, sw.sum()))
    ing2 = first["cls"][sw] * _PER_CLASS + other % _PER_CLASS
    e2, f2 = eras(rows[sw], ing2, start2[sw])
    starts = {"person": np.concatenate([rows, rows[sw]]),
              "ing": np.concatenate([first["ing"], ing2]),
              "start": np.concatenate([first["start"], start2[sw]])}
    # Restarts of the same ingredient 61+ days after an era ends.
    rows = np.concatenate([e1["person"], e2["person"]])
    restart = (np.concatenate([e1["end"], e2["end"]]) + 61
               + np.floor(rng.exponential(200.0, rows.size)).astype(np.int64))
    ok = (rng.random(rows.size) < _RESTART_SHARE) & (restart <= p.obs_end[rows])
    e3, f3 = eras(rows[ok], starts["ing"][ok], restart[ok])
    era = {k: np.concatenate([e1[k], e2[k], e3[k]]) for k in e1}
    fill = {k: np.concatenate([f1[k], f2[k], f3[k]]) for k in f1}
    return era, fill, starts


# ----------------------------------------------------------------------------- outcomes
def _first_events(
    rate: np.ndarray, clock: np.ndarray, end: np.ndarray, cp_person: np.ndarray,
    cp_day: np.ndarray, cp_hr: np.ndarray, budget: np.ndarray,
) -> np.ndarray:
    """First event day per person (-1: none) for a daily hazard ``rate`` over days ``clock``
    to ``end``, multiplied by ``cp_hr`` from the day after each change point ``cp_day``.

    ``budget`` is each person's Exp(1) draw: the event falls on the day the cumulative hazard
    reaches it. Change points are handled rank by rank (a person's first, second, ...), each
    pass vectorised over the persons that have one.
    """
    order = _person_order(cp_person, cp_day)
    cp_person, cp_day, cp_hr = cp_person[order], cp_day[order], cp_hr[order]
    rank = np.arange(cp_person.size) - np.searchsorted(cp_person, cp_person)
    cur = clock.astype(np.int64).copy()  # first day of the current constant-hazard segment
    mult = np.ones(rate.size)
    budget = budget.copy()
    event = np.full(rate.size, -1, dtype=np.int64)
    done = np.zeros(rate.size, dtype=bool)

    def segment(who: np.ndarray, stop: np.ndarray) -> np.ndarray:
        """Days cur .. stop - 1 of persons ``who``; returns those without an event in it."""
        lam = rate[who] * mult[who]
        cum = lam * np.maximum(stop - cur[who], 0)
        hit = budget[who] < cum
        event[who[hit]] = cur[who[hit]] + np.floor(budget[who[hit]] / lam[hit]).astype(np.int64)
        done[who[hit]] = True
        budget[who[~hit]] -= cum[~hit]
        return ~hit

    for k in range(int(rank.max()) + 1 if rank.size else 0):
        sel = np.nonzero(rank == k)[0]
        who = cp_person[sel]
        live = ~done[who]
        sel, who = sel[live], who[live]
        stop = np.minimum(cp_day[sel] + 1, end[who] + 1)
        miss = segment(who, stop)
        who, stop, hr = who[miss], stop[miss], cp_hr[sel][miss]
        cur[who] = np.maximum(cur[who], stop)
        mult[who] *= hr
    who = np.nonzero(~done)[0]
    segment(who, end[who] + 1)
    return event


def _outcome_records(
    p: _ScreenPersons, starts: dict[str, np.ndarray], rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Progression outcome records (first events, repeats, prevalent cases): rows, concept,
    day; and sets ``p.demented``."""
    gamma = np.array([m[3] for m in _CLASS_MODEL.values()])
    log_rate = (np.log(_OUTCOME_BASE / 365.25) + _OUTCOME_AGE * p.a + _OUTCOME_FRAILTY * p.h
                + _OUTCOME_MALE * p.male + p.ind @ gamma)
    log_rate[~p.has_d] += np.log(_NO_DISEASE_SHARE)
    rate = np.exp(log_rate)
    prevalent = p.has_d & (rng.random(p.n) < 0.02) & (p.d0 > p.obs_start)
    rate[prevalent] = 0.0
    hr = np.array(list(SCREEN_TRUE_HR.values()))[starts["ing"]]
    planted = hr != 1.0
    clock = np.where(p.has_d, p.d0 + 1, p.obs_start)
    event = _first_events(rate, clock, p.obs_end, starts["person"][planted],
                          starts["start"][planted], hr[planted],
                          rng.standard_exponential(p.n))
    first = np.nonzero(event >= 0)[0]
    prev = np.nonzero(prevalent)[0]
    prev_day = p.obs_start[prev] + np.floor(rng.random(prev.size)
                                            * (p.d0[prev] - p.obs_start[prev]))
    anchor = np.concatenate([first, prev])
    r, rep_day = p.days_after(anchor, np.concatenate([event[first], p.d0[prev]]), 1.5, rng)
    rows = np.concatenate([first, prev, anchor[r]])
    days = np.concatenate([event[first], prev_day.astype(np.int64), rep_day])
    p.demented[rows] = True
    return rows, np.full(rows.size, SCREEN_OUTCOME_CONCEPT, dtype=np.int64), days


def _negative_control_records(
    p: _ScreenPersons, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recurrent events of every negative control: a Poisson process over observation."""
    span = (p.obs_end - p.obs_start + 1).astype(np.float64)
    rows, concept, days = [], [], []
    for name, (base, effects) in _NC_MODEL.items():
        log_rate = np.full(p.n, np.log(base / 365.25))
        for key, beta in effects.items():
            if key in _CLASS_MODEL:
                log_rate += beta * p.ind[:, _CLASSES.index(key)]
            else:
                log_rate += beta * {"age": p.a, "male": p.male, "frailty": p.h}[key]
        r = np.repeat(np.arange(p.n), rng.poisson(np.exp(log_rate) * span))
        rows.append(r)
        concept.append(np.full(r.size, SCREEN_NEGATIVE_CONTROLS[name], dtype=np.int64))
        days.append(p.uniform_observed_day(r, rng))
    return np.concatenate(rows), np.concatenate(concept), np.concatenate(days)


def _indication_records(
    p: _ScreenPersons, first: dict[str, np.ndarray], rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recorded carriers: one record in the 365 days before their first start of the class
    (anywhere in observation when they never start one), plus Poisson(0.8) repeats."""
    ids = np.array(list(SCREEN_INDICATIONS.values()), dtype=np.int64)
    started = np.zeros(p.ind.shape, dtype=bool)
    started[first["person"], first["cls"]] = True
    pre = p.ind_recorded[first["person"], first["cls"]]
    r1, k1 = first["person"][pre], first["cls"][pre]
    d1 = np.maximum(first["start"][pre] - 1 - rng.integers(0, 365, r1.size), p.obs_start[r1])
    r2, k2 = np.nonzero(p.ind_recorded & ~started)
    d2 = p.uniform_observed_day(r2, rng)
    r3, k3 = np.nonzero(p.ind_recorded)
    reps = rng.poisson(0.8, r3.size)
    r3, k3 = np.repeat(r3, reps), np.repeat(k3, reps)
    d3 = p.uniform_observed_day(r3, rng)
    return (np.concatenate([r1, r2, r3]), ids[np.concatenate([k1, k2, k3])],
            np.concatenate([d1, d2, d3]))


def _disease_records(p: _ScreenPersons, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    first = np.nonzero(p.has_d)[0]
    r, day = p.days_after(first, p.d0[first], 2.0, rng)
    rows = np.concatenate([first, first[r]])
    return (rows, np.full(rows.size, SCREEN_DISEASE_CONCEPT, dtype=np.int64),
            np.concatenate([p.d0[first], day]))


# ----------------------------------------------------------------------------- vocabulary
def _concept_rows() -> dict[str, list]:
    voc = SCREEN_VOCABULARY_ID
    rows: list[tuple[int, str, str, str, str, str | None, str]] = [
        (0, "No matching concept", "Metadata", "None", "Undefined", None, "No matching concept"),
        (GENDER_MALE, "MALE", "Gender", "Gender", "Gender", "S", "M"),
        (GENDER_FEMALE, "FEMALE", "Gender", "Gender", "Gender", "S", "F"),
        (_VISIT_OUTPATIENT, "Outpatient Visit", "Visit", "Visit", "Visit", "S", "OP"),
    ]

    def local(cid: int, name: str, domain: str, cls: str, vocabulary: str = voc,
              standard: str = "S", code: str | None = None) -> None:
        rows.append((cid, name, domain, vocabulary, cls, standard,
                     code or f"CS{cid - _BASE:07d}"))

    # the demo simulator's type concepts (its table writers use them)
    local(_TYPE_EHR, "EHR record (demo)", "Type Concept", "Type Concept")
    local(_TYPE_PERIOD, "Period covering healthcare encounters (demo)", "Type Concept",
          "Type Concept")
    local(SCREEN_DISEASE_CONCEPT, "Mild cognitive impairment", "Condition", "Clinical Finding")
    local(SCREEN_OUTCOME_CONCEPT, "Dementia", "Condition", "Clinical Finding")
    for code, (cid, name) in SCREEN_ATC_FIRST_LEVELS.items():
        local(cid, name, "Drug", "ATC 1st", "ATC", "C", code)
    for code, cid in SCREEN_ATC_CLASSES.items():
        local(cid, _CLASS_MODEL[code][0], "Drug", "ATC 2nd", "ATC", "C", code)
    names = {code: name for levels in _THIRD_LEVELS.values() for code, name, _ in levels}
    for code, cid in SCREEN_ATC_THIRD_LEVELS.items():
        local(cid, names[code], "Drug", "ATC 3rd", "ATC", "C", code)
    for name, cid in SCREEN_INGREDIENTS.items():
        local(cid, name, "Drug", "Ingredient", "RxNorm", "S", str(cid - _BASE))
    for code, cid in SCREEN_INDICATIONS.items():
        local(cid, _CLASS_MODEL[code][1], "Condition", "Clinical Finding")
    for name, cid in SCREEN_NEGATIVE_CONTROLS.items():
        local(cid, name, "Condition", "Clinical Finding")
    for i, cid in enumerate(_NOISE_CONDITION_IDS):
        local(int(cid), f"condition_{i + 1:03d}", "Condition", "Clinical Finding")
    for i, cid in enumerate(_PROCEDURE_IDS):
        local(int(cid), f"procedure_{i + 1:03d}", "Procedure", "Procedure")
    cols = list(zip(*rows, strict=True))
    keys = ("concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
            "standard_concept", "concept_code")
    return {k: list(v) for k, v in zip(keys, cols, strict=True)}


def _ancestor_rows(concept: dict[str, list]) -> dict[str, np.ndarray]:
    pairs = [(c, c, 0) for c, s in zip(concept["concept_id"], concept["standard_concept"],
                                       strict=True) if s in ("S", "C")]
    for name, cid in SCREEN_INGREDIENTS.items():  # each ingredient's chain, top down
        third = SCREEN_THIRD_LEVEL_OF[name]
        chain = [SCREEN_ATC_FIRST_LEVELS[third[0]][0], SCREEN_ATC_CLASSES[third[:3]],
                 SCREEN_ATC_THIRD_LEVELS[third], cid]
        pairs += [(chain[i], chain[j], j - i) for i in range(3) for j in range(i + 1, 4)]
    pairs = list(dict.fromkeys(pairs))  # class pairs once, in first-seen order
    arr = np.array(pairs, dtype=np.int64)
    return {"ancestor_concept_id": arr[:, 0], "descendant_concept_id": arr[:, 1],
            "min_levels_of_separation": arr[:, 2], "max_levels_of_separation": arr[:, 2]}


# ----------------------------------------------------------------------------- main
def generate_screen_cdm(out_dir: Path, *, persons: int = 60_000, seed: int = 0) -> Path:
    """Write the screen simulator's OMOP CDM v5.3 (``<table>.parquet``) and ``truth.csv``.

    ``out_dir`` is created if needed; only the files named in ``cohort.synthetic.CDM_SCHEMA``
    and ``truth.csv`` are (over)written. Deterministic in (``persons``, ``seed``). Returns the
    path of ``truth.csv``: one row per ingredient and outcome (the progression outcome, role
    ``outcome``, and each negative control, role ``negative_control``) with columns
    ingredient, ingredient_concept_id, atc_class, atc_class_concept_id, outcome,
    outcome_concept_id, role, true_hr, kind (the ingredient's: protective | harmful | null |
    decoy; negative-control rows keep it, with true_hr 1).
    """
    if persons < 1:
        raise ValueError("persons must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = _ScreenPersons(persons, seed)
    pid = p.person_id

    _write_person(out_dir, pid, p.male, p.birth)
    _write_observation_periods(out_dir, pid, p.obs_start, p.obs_end)

    # Drugs first: the outcome hazard follows their starts.
    first = _drug_starts(p, _rng(seed, 102))
    era, fill, starts = _drug_records(p, first, _rng(seed, 103))
    _write_drug_records(out_dir, pid, era, fill)
    del era, fill

    # condition_occurrence: D, the outcome, indications, negative controls, noise
    parts = [
        _disease_records(p, _rng(seed, 104)),
        _outcome_records(p, starts, _rng(seed, 105)),
        _indication_records(p, first, _rng(seed, 106)),
        _negative_control_records(p, _rng(seed, 107)),
        _noise_records(p, 8.0, _NOISE_CONDITION_IDS,
                       _zipf_probs(_N_NOISE_CONDITIONS, 1.1, 3.0), _rng(seed, 108)),
    ]
    del first, starts
    c_rows = np.concatenate([x[0] for x in parts])
    c_concept = np.concatenate([x[1] for x in parts])
    c_start = np.concatenate([x[2] for x in parts]).astype(np.int64)
    del parts
    _write_conditions(out_dir, pid, c_rows, c_concept, c_start,
                      _condition_end(c_start, p.obs_end[c_rows], _rng(seed, 109)))
    del c_concept
    pr_rows, pr_concept, pr_day = _noise_records(
        p, 3.0, _PROCEDURE_IDS, _zipf_probs(_N_PROCEDURES, 1.2, 2.0), _rng(seed, 110))
    _write_procedures(out_dir, pid, pr_rows, pr_concept, pr_day)
    del pr_concept

    # visit_occurrence: one outpatient visit per person-day with a condition or procedure
    key = np.concatenate([
        (c_rows.astype(np.int64) << 20) | (c_start - _FAR_PAST),
        (pr_rows.astype(np.int64) << 20) | (pr_day - _FAR_PAST),
    ])
    key.sort()  # sort + adjacent difference: several times faster than np.unique's hashing
    first_of_day = np.ones(key.size, dtype=bool)
    first_of_day[1:] = key[1:] != key[:-1]
    key = key[first_of_day]
    del c_rows, c_start, pr_rows, pr_day
    v_day = (key & ((1 << 20) - 1)) + _FAR_PAST
    _write(out_dir, "visit_occurrence", _arrow("visit_occurrence", key.size, {
        "visit_occurrence_id": np.arange(1, key.size + 1, dtype=np.int64),
        "person_id": pid[key >> 20],
        "visit_concept_id": _VISIT_OUTPATIENT,
        "visit_start_date": v_day,
        "visit_end_date": v_day,
        "visit_type_concept_id": _TYPE_EHR,
    }))
    del key, v_day

    rng = _rng(seed, 111)
    died = np.nonzero(rng.random(p.n) < _sigmoid(-3.6 + 0.8 * p.a + 0.4 * p.h
                                                 + 1.2 * p.demented))[0]
    _write(out_dir, "death", _arrow("death", died.size, {
        "person_id": pid[died],
        "death_date": p.obs_end[died],
        "death_type_concept_id": _TYPE_EHR,
    }))
    for empty in ("measurement", "observation", "concept_relationship"):
        _write(out_dir, empty, _arrow(empty, 0, {}))

    concept = _concept_rows()
    _write_vocabulary(out_dir, concept, _ancestor_rows(concept), [
        (SCREEN_VOCABULARY_ID, "Cohortflow screen simulator vocabulary",
         "cohort/synthetic_screen.py", "1"),
        ("RxNorm", "RxNorm (invented ingredients of the screen simulator)",
         "cohort/synthetic_screen.py", "1"),
        ("ATC", "WHO Anatomic Therapeutic Chemical Classification (real codes, invented ids)",
         "cohort/synthetic_screen.py", "1"),
        ("Gender", "OMOP Gender", "OMOP generated", None),
        ("Visit", "OMOP Visit", "OMOP generated", None),
        ("Type Concept", "OMOP Type Concept", "OMOP generated", None),
        ("None", "OMOP Standardized Vocabularies", "OMOP generated", None),
    ], (
        "Cohortflow synthetic drug-repurposing screen CDM", "cohortflow_screen",
        f"Synthetic screen data with planted effects: {persons} persons, seed {seed}; "
        "see truth.csv", "cohort/synthetic_screen.py",
        "cohort.synthetic_screen.generate_screen_cdm", "2023-01-01",
        f"{SCREEN_VOCABULARY_ID} {SCREEN_GENERATOR_VERSION}"))

    outcomes = [(SCREEN_OUTCOME, SCREEN_OUTCOME_CONCEPT, "outcome")] + [
        (nc, cid, "negative_control") for nc, cid in SCREEN_NEGATIVE_CONTROLS.items()]
    return _write_csv(out_dir / "truth.csv", [
        "ingredient", "ingredient_concept_id", "atc_class", "atc_class_concept_id", "outcome",
        "outcome_concept_id", "role", "true_hr", "kind",
    ], ([drug, cid, SCREEN_CLASS_OF[drug], SCREEN_ATC_CLASSES[SCREEN_CLASS_OF[drug]], outcome,
         oid, role, SCREEN_TRUE_HR[drug] if role == "outcome" else 1.0, SCREEN_KIND[drug]]
        for drug, cid in SCREEN_INGREDIENTS.items() for outcome, oid, role in outcomes))


def main(argv: Sequence[str] | None = None) -> None:
    """Generate a screen CDM from the command line and report rows, seconds and peak memory."""
    parser = argparse.ArgumentParser(prog="python -m cohort.synthetic_screen",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/screen_cdm"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    truth = generate_screen_cdm(args.out, persons=args.persons, seed=args.seed)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    size_mib = sum(f.stat().st_size for f in args.out.glob("*.parquet")) / 2**20
    print(f"{args.persons} persons (seed {args.seed}) -> {args.out}: {size_mib:.1f} MiB of "
          f"Parquet in {seconds:.1f} s, peak memory {peak_mib:.0f} MiB; truth: {truth}")


if __name__ == "__main__":
    main()
