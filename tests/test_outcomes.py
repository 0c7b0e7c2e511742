"""Outcomes from every event table, on hand-made CDMs: every event time worked out by hand.

Drugs T (treatment, 101) and C (comparator, 102); every person is observed from 2010-01-01
(so prior observation and washout pass) to 2015-12-31 unless noted, born 1960.
Outcome concepts: PROC 501 and PROC2 502 (Procedure), MEAS 601 (Measurement), OBS 701
(Observation), COND 201 (Condition), DRUG_OUT 401 (Drug).
Concept sets: proc {501}, meas {601}, obs {701}, mixed {201, 502}, drug_out {401}.

  person arm index       records                            event time (start_day 0)
  1      T   2012-01-01  procedure 501 2012-01-10            proc 10
                         observation 701 2013-01-01          obs 367 (2012 is a leap year)
                         condition 201 2012-02-01 (day 31)   mixed 20: the first of either
                         procedure 502 2012-01-20 (day 19)
  2      C   2012-01-01  observed to 2012-12-31: 366 days at risk
                         procedure 501 2012-12-31            proc 366 (last day at risk)
                         procedure 501 2013-02-01            after the end: ignored
                         condition 201 2012-03-01 (day 60)   mixed 61
  3      T   2012-03-01  measurement 601 2012-03-05          meas 5 (start_day 1: 4)
                         observation 701 2012-01-15          obs prior (46 days before index:
                                                             not within a 30-day lookback)
                         procedure 502 2012-04-01 (day 31)   mixed 32
                         condition 201 2012-05-01            later than the procedure
  4      C   2012-06-01  measurement 601 2012-06-01 (day 0)  meas 1; with start_day 1: prior,
                                                             no event
                         observation 701 2012-05-02          obs prior (exactly 30 days before
                                                             index: inside a 30-day lookback)
                         observation 701 2012-07-01          obs 31 (and prior)
  5      T   2012-01-01  measurement 501 2012-02-01          a procedure concept in the
                                                             measurement table: not scanned for
                                                             proc when domains are known; read
                                                             (proc 32) without a concept table
  6      C   2012-03-01  observation 701 2011-01-01          obs prior (lookback None only)

Death (tests that add death rows): person 2 dies 2012-12-31 (the last day at risk: death 366),
person 5 dies 2012-07-01 (death 183 = 31+29+31+30+31+30 days later + 1), person 6 dies on
its index day 2012-03-01 (death 1 with start_day 0; with start_day 1 a prior outcome).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from cohort.comparison_data import load_comparison
from cohort.design import DEATH, CohortDesign, ConceptSetDef, OutcomeDef
from cohort.outcomes import outcome_requirements
from cohort.prepare import prepare_study
from cohort.source import REQUIRED_COLUMNS, SourceError, open_source
from tests.shared_data import GIBLEED, needs
from tests.tiny_cdm import concepts, d, write_cdm

T, C, COND, DRUG_OUT, PROC, PROC2, MEAS, OBS = 101, 102, 201, 401, 501, 502, 601, 701
ROOT = Path(__file__).parents[1]

SETS = {
    "t": ConceptSetDef("t", (T,)), "c": ConceptSetDef("c", (C,)),
    "proc": ConceptSetDef("proc", (PROC,)), "meas": ConceptSetDef("meas", (MEAS,)),
    "obs": ConceptSetDef("obs", (OBS,)), "mixed": ConceptSetDef("mixed", (COND, PROC2)),
    "drug_out": ConceptSetDef("drug_out", (DRUG_OUT,)),
}
ORDINARY = ("proc", "meas", "obs", "mixed")


def outcome_cdm(folder: Path, *, death=(), with_concepts=True) -> Path:
    obs, end = d("2010-01-01"), d("2015-12-31")
    ids = (T, C, COND, DRUG_OUT, PROC, PROC2, MEAS, OBS)
    vocabulary = dict(
        concept=concepts((T, "drug T", "Drug"), (C, "drug C", "Drug"),
                         (COND, "condition", "Condition"), (DRUG_OUT, "drug Y", "Drug"),
                         (PROC, "procedure", "Procedure"), (PROC2, "procedure 2", "Procedure"),
                         (MEAS, "measurement", "Measurement"), (OBS, "observation", "Observation"),
                         (8507, "MALE", "Gender")),
    ) if with_concepts else {}
    return write_cdm(
        folder,
        person=[(p, 8507, 1960) for p in range(1, 7)],
        observation_period=[(p, obs, d("2012-12-31") if p == 2 else end) for p in range(1, 7)],
        drug_era=[(1, T, d("2012-01-01"), d("2012-02-01")),
                  (2, C, d("2012-01-01"), d("2012-02-01")),
                  (3, T, d("2012-03-01"), d("2012-04-01")),
                  (4, C, d("2012-06-01"), d("2012-07-01")),
                  (5, T, d("2012-01-01"), d("2012-02-01")),
                  (6, C, d("2012-03-01"), d("2012-04-01"))],
        condition_occurrence=[(1, COND, d("2012-02-01")), (2, COND, d("2012-03-01")),
                              (3, COND, d("2012-05-01"))],
        procedure_occurrence=[(1, PROC, d("2012-01-10")), (1, PROC2, d("2012-01-20")),
                              (2, PROC, d("2012-12-31")), (2, PROC, d("2013-02-01")),
                              (3, PROC2, d("2012-04-01"))],
        measurement=[(3, MEAS, d("2012-03-05")), (4, MEAS, d("2012-06-01")),
                     (5, PROC, d("2012-02-01"))],
        observation=[(1, OBS, d("2013-01-01")), (3, OBS, d("2012-01-15")),
                     (4, OBS, d("2012-05-02")), (4, OBS, d("2012-07-01")),
                     (6, OBS, d("2011-01-01"))],
        death=list(death),
        concept_ancestor=[(i, i) for i in ids],
        **vocabulary,
    )


DEATHS = [(2, d("2012-12-31")), (5, d("2012-07-01")), (6, d("2012-03-01"))]


def design(**changes) -> CohortDesign:
    base = dict(
        concept_sets=SETS, exposure_table="drug_era", comparisons=(("t", "c"),),
        prior_observation_days=365, washout_days=365, min_age=18,
        outcomes=tuple(OutcomeDef(name) for name in ORDINARY), risk_start_day=0,
        risk_end_day=None, exclude_prior_outcome=True, covariate_windows=((-365, -1),),
        covariate_domains=("condition", "demographics"), min_prevalence=0.0,
    )
    base.update(changes)
    return CohortDesign(**base)


def times(con: duckdb.DuckDBPyConnection) -> dict[tuple[int, str], tuple[int | None, bool]]:
    """(person_id, outcome) -> (event_time, prior_outcome) from the temp tables."""
    rows = con.execute("""
        SELECT h.person_id, o.outcome, t.event_time, t.prior_outcome
        FROM cf_outcome_time t JOIN cf_cohort h USING (comparison_id, row_id)
        JOIN cf_outcome o USING (outcome_id)
    """).fetchall()
    return {(person, outcome): (time, prior) for person, outcome, time, prior in rows}


def events(found: dict, outcome: str) -> dict[int, int]:
    return {p: t for (p, o), (t, _) in found.items() if o == outcome and t is not None}


def priors(found: dict, outcome: str) -> set[int]:
    return {p for (p, o), (_, prior) in found.items() if o == outcome and prior}


@pytest.fixture
def run(tmp_path):
    """prepare_study on an outcome CDM; returns (times, prepared)."""
    def go(cdm_options=None, **changes):
        source = open_source(outcome_cdm(tmp_path / "cdm", **(cdm_options or {})))
        try:
            prepared = prepare_study(source, design(**changes), tmp_path / "ws")
            return times(source.con), prepared
        finally:
            source.close()
    return go


def test_outcomes_from_every_event_table(run, tmp_path):
    found, prepared = run()
    assert events(found, "proc") == {1: 10, 2: 366}   # person 5's record is in measurement
    assert events(found, "meas") == {3: 5, 4: 1}       # person 4: day 0 counts from start_day 0
    assert events(found, "obs") == {1: 367, 4: 31}
    assert events(found, "mixed") == {1: 20, 2: 61, 3: 32}  # first of condition or procedure
    assert priors(found, "obs") == {3, 4, 6}
    assert not priors(found, "proc") | priors(found, "meas") | priors(found, "mixed")
    # the analysis arrays (read from the workspace) carry the same times
    data = load_comparison(tmp_path / "ws", 1, list(prepared.outcomes["outcome_id"]))
    proc = data.outcomes[int(prepared.outcomes.set_index("outcome").loc["proc", "outcome_id"])]
    assert sorted(proc.time[proc.event == 1]) == [10, 366]
    steps = prepared.attrition.query("step == 'no_prior_outcome'").set_index("outcome")
    assert steps.loc["obs", "description"] == "no outcome before the start of follow-up"
    assert (steps.loc["obs", "treated_persons"], steps.loc["obs", "comparator_persons"]) == (2, 1)
    assert (steps.loc["proc", "treated_persons"], steps.loc["proc", "comparator_persons"]) == (
        3, 3)


def test_start_day_one_makes_a_day_zero_event_prior(run):
    found, _ = run(risk_start_day=1)
    assert events(found, "meas") == {3: 4}       # 2012-03-05 from risk start 2012-03-02
    assert priors(found, "meas") == {4}          # its day-0 measurement is before day 1


def test_prior_outcome_lookback(run):
    found, prepared = run(prior_outcome_lookback_days=30)
    assert priors(found, "obs") == {4}           # 3 (46 days) and 6 (14 months) are too early
    assert events(found, "obs") == {1: 367, 4: 31}
    steps = prepared.attrition.query("step == 'no_prior_outcome'").set_index("outcome")
    assert steps.loc["obs", "description"] == (
        "no outcome in the 30 days before the start of follow-up")
    assert (steps.loc["obs", "treated_persons"], steps.loc["obs", "comparator_persons"]) == (3, 2)
    found, _ = run(prior_outcome_lookback_days=None)
    assert priors(found, "obs") == {3, 4, 6}


def test_without_a_concept_table_every_event_table_is_scanned(run):
    found, _ = run(cdm_options={"with_concepts": False})
    assert events(found, "proc") == {1: 10, 2: 366, 5: 32}  # person 5's measurement record
    assert events(found, "mixed") == {1: 20, 2: 61, 3: 32}


def test_all_cause_death(run):
    found, prepared = run(cdm_options={"death": DEATHS},
                          outcomes=(OutcomeDef(DEATH), OutcomeDef("proc")))
    assert events(found, DEATH) == {2: 366, 5: 183, 6: 1}  # death on the last day at risk counts
    assert events(found, "proc") == {1: 10, 2: 366}
    assert not priors(found, DEATH)
    assert list(prepared.outcomes["outcome"]) == [DEATH, "proc"]


def test_death_before_risk_start_is_a_prior_outcome(run):
    found, _ = run(cdm_options={"death": DEATHS}, risk_start_day=1, censor_at_death=False,
                   outcomes=(OutcomeDef(DEATH),))
    assert priors(found, DEATH) == {6}           # died on day 0, follow-up starts on day 1
    assert events(found, DEATH) == {2: 365, 5: 182}


def test_death_with_an_empty_death_table_is_refused(run):
    with pytest.raises(SourceError, match=r"outcome death \(all-cause death\) needs death "
                                          r"records.*no rows with a death_date"):
        run(outcomes=(OutcomeDef(DEATH),))


def test_a_death_concept_set_is_an_ordinary_concept_set(run):
    sets = {**SETS, DEATH: ConceptSetDef(DEATH, (OBS,))}
    found, _ = run(cdm_options={"death": DEATHS}, concept_sets=sets,
                   outcomes=(OutcomeDef(DEATH),))
    assert events(found, DEATH) == {1: 367, 4: 31}  # the observation records, not the deaths


def test_outcome_of_an_unsupported_domain_is_refused(run):
    with pytest.raises(SourceError, match=r"outside the Condition, Procedure, Measurement and "
                                          r"Observation domains.*drug_out \(Drug\)"):
        run(outcomes=(OutcomeDef("proc"), OutcomeDef("drug_out")))


def test_outcome_requirements(tmp_path):
    source = open_source(outcome_cdm(tmp_path / "cdm"))
    try:
        needs = outcome_requirements(source, design(
            outcomes=(OutcomeDef("meas"), OutcomeDef("mixed"), OutcomeDef(DEATH))))
        assert needs == {t: REQUIRED_COLUMNS[t] for t in (
            "measurement", "condition_occurrence", "procedure_occurrence", "death")}
        with pytest.raises(SourceError, match=r"drug_out \(Drug\)"):
            outcome_requirements(source, design(outcomes=(OutcomeDef("drug_out"),)))
    finally:
        source.close()
    source = open_source(outcome_cdm(tmp_path / "bare", with_concepts=False))
    try:
        assert set(outcome_requirements(source, design(outcomes=(OutcomeDef("meas"),)))) == {
            "condition_occurrence", "procedure_occurrence", "measurement", "observation"}
    finally:
        source.close()


# --- real data -----------------------------------------------------------------------------

SUTURE, THROAT_CULTURE = 4125906, 4024958  # Procedure "Suture open wound"; Measurement

INDEPENDENT = """
WITH cohort AS (SELECT person_id, treated, risk_start, risk_end FROM '{ws}/cohort/*/*.parquet'),
record AS (
    SELECT 'suture' AS outcome, person_id, procedure_date AS day
    FROM '{d}/procedure_occurrence.parquet'
    WHERE procedure_concept_id IN (SELECT descendant_concept_id
          FROM '{d}/concept_ancestor.parquet' WHERE ancestor_concept_id = {suture})
    UNION ALL
    SELECT 'throat_culture', person_id, measurement_date
    FROM '{d}/measurement.parquet'
    WHERE measurement_concept_id IN (SELECT descendant_concept_id
          FROM '{d}/concept_ancestor.parquet' WHERE ancestor_concept_id = {culture})
)
SELECT r.outcome, c.person_id, c.treated,
       min(r.day) FILTER (WHERE r.day BETWEEN c.risk_start AND c.risk_end)
           - c.risk_start + 1 AS event_time,
       bool_or(r.day < c.risk_start) AS prior
FROM cohort c JOIN record r ON r.person_id = c.person_id
GROUP BY r.outcome, c.person_id, c.treated, c.risk_start
"""


@pytest.mark.shared_data
@needs(GIBLEED)
def test_gibleed_procedure_and_measurement_outcomes(tmp_path):
    sets = {"celecoxib": ConceptSetDef("celecoxib", (1118084,)),
            "diclofenac": ConceptSetDef("diclofenac", (1124300,)),
            "suture": ConceptSetDef("suture", (SUTURE,)),
            "throat_culture": ConceptSetDef("throat_culture", (THROAT_CULTURE,))}
    gibleed = design(concept_sets=sets, comparisons=(("celecoxib", "diclofenac"),),
                     outcomes=(OutcomeDef("suture"), OutcomeDef("throat_culture")))
    source = open_source(GIBLEED)
    try:
        assert set(outcome_requirements(source, gibleed)) == {"procedure_occurrence",
                                                              "measurement"}
        prepare_study(source, gibleed, tmp_path / "ws")
        found = times(source.con)
    finally:
        source.close()
    expected = duckdb.sql(INDEPENDENT.format(ws=tmp_path / "ws", d=GIBLEED, suture=SUTURE,
                                             culture=THROAT_CULTURE)).df()
    for outcome in ("suture", "throat_culture"):
        mine = expected[expected["outcome"] == outcome]
        with_event = mine[mine["event_time"].notna()]
        assert len(with_event) > 10, outcome            # a real test, not 0 == 0
        assert events(found, outcome) == dict(zip(
            with_event["person_id"], with_event["event_time"].astype(int), strict=True))
        assert priors(found, outcome) == set(mine.loc[mine["prior"], "person_id"])
