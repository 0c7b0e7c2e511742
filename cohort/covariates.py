"""Baseline covariates for every comparison in one SQL pass (tables cf_covariate, covariate_ref).

What: binary indicators in the style of OHDSI FeatureExtraction (FE), one row per comparison,
person (row_id) and covariate present. Why binary: `comparison_data` builds a sparse 0/1 matrix
for the propensity model and the balance diagnostics, so counts and scores are cut into bands,
each band its own covariate.

Analyses (covariate id = value * 1000 + analysis id, FE's scheme; `covariate_catalogue`
lists them for a design):
- concepts recorded in a window of days relative to time zero (inclusive; records with a span,
  such as drug eras, drug exposures and visits, count when they overlap the window):
  condition 1x, drug 2x, procedure 3x, measurement 4x, observation 5x (x = window index).
  Drugs are ingredients: drug_era rows (ingredient level by construction) or, when drug_era is
  empty, drug_exposure rolled up to its ingredient ancestors (concept_ancestor + concept with
  concept_class_id 'Ingredient'); a drug concept the vocabulary cannot roll up stays at its own
  id, and a warning says how many records that affects.
- visits: the number of visits of each visit_concept_id overlapping a window (FE's
  VisitConceptCount, analyses 923-925, counts rows the same way) cut into bands
  1 | 2-3 | 4-7 | 8+ (analyses 6x, 7x, 8x, 9x). FE keeps the count as a continuous covariate;
  doubling bands keep the 0/1 matrix while resolving the low counts where most persons are
  and still separating heavy users (8+ outpatient visits a year is common in claims data).
- demographics: sex (901), 5-year age group (902), index year (903), index month (904).
- Charlson comorbidity index, Romano adaptation (FE analysis 901, CharlsonIndex.sql): FE's
  17 categories (ancestor concepts and weights in CHARLSON_CATEGORIES) over every
  condition_occurrence record starting on or before the latest window end (FE: "all conditions
  prior to the window end"; FE reads condition_era, whose eras start on a condition's first
  occurrence, so the set of categories per person is the same). One score band per person
  (0 | 1 | 2 | 3-4 | 5+, analysis 910) and one indicator per category present (911).
  Unlike FE (whose SQL sums every category present: OHDSI/FeatureExtraction issue #162),
  diabetes with chronic complications replaces diabetes, moderate to severe liver disease
  replaces mild liver disease, and a metastatic solid tumour replaces any malignancy, in the
  score (Charlson's and Quan's scoring; CHARLSON_HIERARCHY); FE adds no age points and neither
  do we.

Concepts that define a comparison's arms (cf_arm_concept), their descendants and the
ingredients they contain are never covariates in that comparison. Covariates present in fewer
than `min_prevalence` of a comparison's persons are dropped for that comparison.

Speed: one statement (a UNION ALL of the domains, DISTINCT once over the concept domains)
finds the covariates of each distinct cohort entry (person, time zero) once, however many
comparisons share it (a screen of many drugs shares most entries), then hands them to every
comparison's rows; deduplication, not the joins, dominates at a million persons.

Config values reach the SQL only as registered tables or bound parameters; the SQL text is
assembled from the constants in this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pandas as pd

from cohort.concepts import concept_names
from cohort.design import CohortDesign
from cohort.source import RecordSource

# domain -> (analysis code, table, concept column, start column, end column or None)
DOMAIN_RECORDS = {
    "condition": (1, "condition_occurrence", "condition_concept_id", "condition_start_date",
                  None),
    "drug": (2, "drug_era", "drug_concept_id", "drug_era_start_date", "drug_era_end_date"),
    "procedure": (3, "procedure_occurrence", "procedure_concept_id", "procedure_date", None),
    "measurement": (4, "measurement", "measurement_concept_id", "measurement_date", None),
    "observation": (5, "observation", "observation_concept_id", "observation_date", None),
}
DRUG_EXPOSURE_RECORDS = (2, "drug_exposure", "drug_concept_id", "drug_exposure_start_date",
                         "drug_exposure_end_date")
VISIT_RECORDS = (6, "visit_occurrence", "visit_concept_id", "visit_start_date", "visit_end_date")
CHARLSON_RECORDS = (91, "condition_occurrence", "condition_concept_id", "condition_start_date",
                    None)
SEX, AGE_GROUP, INDEX_YEAR, INDEX_MONTH, DISEASE_DURATION = 901, 902, 903, 904, 905
# Days from a disease cohort's first diagnosis to time zero: (value, lowest, highest, label).
DISEASE_BANDS = ((1, 0, 30, "0-30 days"), (2, 31, 90, "31-90 days"), (3, 91, 180, "91-180 days"),
                 (4, 181, 365, "181-365 days"), (5, 366, 730, "1-2 years"),
                 (6, 731, 1825, "2-5 years"), (7, 1826, None, "5 years or more"))
CHARLSON_SCORE, CHARLSON_CATEGORY = 910, 911
FIRST_VALUE_ANALYSIS = 900  # analyses below are concept ids (arm concepts excluded from them)

# Visit-count bands: (analysis code, lowest count, highest count or None, label).
VISIT_BANDS = ((6, 1, 1, "1"), (7, 2, 3, "2-3"), (8, 4, 7, "4-7"), (9, 8, None, "8+"))
# Charlson score bands: (value in the covariate id = lowest score, highest or None, label).
CHARLSON_BANDS = ((0, 0, 0, "0"), (1, 1, 1, "1"), (2, 2, 2, "2"), (3, 3, 4, "3-4"),
                  (5, 5, None, "5+"))


@dataclass(frozen=True)
class CharlsonCategory:
    category_id: int
    name: str
    weight: int
    ancestors: tuple[int, ...]
    replaced_by: int | None = None  # a more severe category that takes its place in the score


# From OHDSI/FeatureExtraction inst/sql/sql_server/CharlsonIndex.sql (commit bceb943082e8,
# after PR #115 removed 4192279 from "Diabetes with chronic complications"): diag_category_id,
# diag_category_name (FE spells 12 "Hemoplegia or paralegia"), weight, and the ancestor
# concept ids whose concept_ancestor descendants define the category. `replaced_by` is ours
# (the Charlson hierarchy FE does not apply; see CHARLSON_HIERARCHY).
CHARLSON_CATEGORIES = (
    CharlsonCategory(1, "Myocardial infarction", 1, (4329847,)),
    CharlsonCategory(2, "Congestive heart failure", 1, (316139,)),
    CharlsonCategory(3, "Peripheral vascular disease", 1, (321052,)),
    CharlsonCategory(4, "Cerebrovascular disease", 1, (381591, 434056)),
    CharlsonCategory(5, "Dementia", 1, (4182210,)),
    CharlsonCategory(6, "Chronic pulmonary disease", 1, (4063381,)),
    CharlsonCategory(7, "Rheumatologic disease", 1,
                     (257628, 134442, 80800, 80809, 256197, 255348)),
    CharlsonCategory(8, "Peptic ulcer disease", 1, (4247120,)),
    CharlsonCategory(9, "Mild liver disease", 1, (4064161, 4212540), replaced_by=15),
    CharlsonCategory(10, "Diabetes (mild to moderate)", 1, (201820,), replaced_by=11),
    CharlsonCategory(11, "Diabetes with chronic complications", 2, (443767, 442793)),
    CharlsonCategory(12, "Hemiplegia or paraplegia", 2, (192606, 374022)),
    CharlsonCategory(13, "Renal disease", 2, (4030518,)),
    CharlsonCategory(14, "Any malignancy", 2, (443392,), replaced_by=16),
    CharlsonCategory(15, "Moderate to severe liver disease", 3, (4245975, 4029488, 192680, 24966)),
    CharlsonCategory(16, "Metastatic solid tumor", 6, (432851,)),
    CharlsonCategory(17, "AIDS", 6, (439727,)),
)
# True: a category with `replaced_by` adds nothing to the score when the replacing category is
# present (Charlson's rule for diabetes, liver disease and cancer). False: FE's sum.
CHARLSON_HIERARCHY = True

# Each concept's ingredient ancestors (the concept itself when it is an ingredient). Constant SQL.
INGREDIENT_OF = """
    SELECT a.descendant_concept_id AS concept_id, a.ancestor_concept_id AS ingredient_concept_id
    FROM concept_ancestor a JOIN concept c ON c.concept_id = a.ancestor_concept_id
    WHERE c.concept_class_id = 'Ingredient'
    UNION
    SELECT concept_id, concept_id FROM concept WHERE concept_class_id = 'Ingredient'
"""
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")


def domain_records(source: RecordSource, domain: str) -> tuple[int, str, str, str, str | None]:
    """Where a domain's records live: (analysis code, table, concept, start, end column).

    Drugs come from drug_era, else drug_exposure; visits from visit_occurrence (the end column
    only when the source has one); Charlson from condition_occurrence.
    """
    if domain == "drug" and not source.has_rows("drug_era"):
        return DRUG_EXPOSURE_RECORDS
    if domain == "visit":
        has_end = "visit_end_date" in source.tables.get("visit_occurrence", [])
        return VISIT_RECORDS if has_end else (*VISIT_RECORDS[:4], None)
    if domain == "charlson":
        return CHARLSON_RECORDS
    if domain not in DOMAIN_RECORDS:
        raise ValueError(f"covariate domain {domain!r} has no record table")
    return DOMAIN_RECORDS[domain]


def charlson_end_day(design: CohortDesign) -> int:
    """The Charlson index reads every condition on or before this day (the latest window end)."""
    return max(end for _start, end in design.covariate_windows)


def _analyses(design: CohortDesign) -> pd.DataFrame:
    """One row per analysis the design produces (see covariate_catalogue for the columns)."""
    windows = list(enumerate(design.covariate_windows))
    if len(windows) > 10:
        raise ValueError("at most 10 covariate windows fit the id scheme (analysis code * 10 + "
                         "window index)")
    rows = []
    domains = design.covariate_domains
    concept_text = {
        "condition": "condition_occurrence records starting in the window",
        "drug": ("drug_era records overlapping the window (ingredients); when drug_era is "
                 "empty, drug_exposure records overlapping the window rolled up to their "
                 "ingredients (a drug concept without an ingredient ancestor keeps its own id)"),
        "procedure": "procedure_occurrence records dated in the window",
        "measurement": "measurement records dated in the window (any value)",
        "observation": "observation records dated in the window (any value)",
    }
    for domain, (code, _table, concept, *_rest) in DOMAIN_RECORDS.items():
        if domain not in domains:
            continue
        column = "ingredient_concept_id" if domain == "drug" else concept
        for window_id, (start, end) in windows:
            analysis_id = code * 10 + window_id
            rows.append((analysis_id, domain, "concept", window_id, start, end, None,
                         f"{column} * 1000 + {analysis_id}", concept_text[domain]))
    if "visit" in domains:
        for code, _low, _high, label in VISIT_BANDS:
            for window_id, (start, end) in windows:
                analysis_id = code * 10 + window_id
                rows.append((analysis_id, "visit", "visit", window_id, start, end, label,
                             f"visit_concept_id * 1000 + {analysis_id}",
                             f"{label} visit(s) of that visit concept overlapping the window"))
    if "demographics" in domains:
        rows += [
            (SEX, "demographics", "sex", None, None, None, None,
             f"gender_concept_id * 1000 + {SEX}", "sex (person.gender_concept_id)"),
            (AGE_GROUP, "demographics", "age_group", None, None, None, None,
             f"floor(age / 5) * 1000 + {AGE_GROUP}",
             "5-year age group at time zero (age = index year - year of birth)"),
            (INDEX_YEAR, "demographics", "index_year", None, None, None, None,
             f"year * 1000 + {INDEX_YEAR}", "calendar year of time zero"),
            (INDEX_MONTH, "demographics", "index_month", None, None, None, None,
             f"month * 1000 + {INDEX_MONTH}", "calendar month of time zero (1-12)"),
        ]
    if design.disease is not None:
        bands = ", ".join(label for *_v, label in DISEASE_BANDS)
        rows.append((DISEASE_DURATION, "disease", "disease_duration", None, None, 0, None,
                     f"band (1-{len(DISEASE_BANDS)}) * 1000 + {DISEASE_DURATION}",
                     f"days from the first record of {design.disease.concept_set} (the disease "
                     f"cohort's diagnosis) to time zero, in bands {bands}"))
    if "charlson" in domains:
        end = charlson_end_day(design)
        bands = ", ".join(label for *_v, label in CHARLSON_BANDS)
        rule = ("diabetes with complications replaces diabetes, moderate/severe liver disease "
                "replaces mild" if CHARLSON_HIERARCHY else "every category present counts")
        rows += [
            (CHARLSON_SCORE, "charlson", "charlson_score", None, None, end, None,
             f"lowest score of the band * 1000 + {CHARLSON_SCORE}",
             f"Charlson index (Romano, FeatureExtraction's categories and weights; {rule}) "
             f"over all conditions up to day {end}, in bands {bands}"),
            (CHARLSON_CATEGORY, "charlson", "charlson_category", None, None, end, None,
             f"category (1-17) * 1000 + {CHARLSON_CATEGORY}",
             f"one indicator per Charlson category recorded up to day {end}"),
        ]
    return pd.DataFrame(rows, columns=[
        "analysis_id", "analysis", "kind", "window_id", "window_start", "window_end", "band",
        "covariate_id", "description",
    ]).astype({"analysis_id": "int64", "window_id": "Int64", "window_start": "Int64",
               "window_end": "Int64"})


def covariate_catalogue(design: CohortDesign) -> pd.DataFrame:
    """Every analysis the design produces, one row each: analysis_id (the id's last three
    digits), domain, window_start, window_end (days; no start = all history), band,
    covariate_id_formula (how the id is formed), description. For `cohortflow covariates`;
    covariate_ref is the per-study list of the ids actually found, with names."""
    frame = _analyses(design).rename(columns={"analysis": "domain",
                                              "covariate_id": "covariate_id_formula"})
    return frame[["analysis_id", "domain", "window_start", "window_end", "band",
                  "covariate_id_formula", "description"]].reset_index(drop=True)


def build_covariates(
    source: RecordSource, design: CohortDesign, warnings: list[str] | None = None
) -> pd.DataFrame:
    """Create temp table cf_covariate(comparison_id, row_id, covariate_id); return covariate_ref.

    Needs temp tables cf_cohort and cf_arm_concept (cohort.cohorts). covariate_ref columns:
    covariate_id, covariate_name, analysis, concept_id, window_start, window_end. What the data
    made us approximate (drugs not rolled up to ingredients, no concept_ancestor) is appended to
    `warnings` when given.
    """
    con = source.con
    domains = design.covariate_domains
    analyses = _analyses(design)
    notes: list[str] = []
    vocabulary = _vocabulary(source)
    _register(con, "cf_covariate_window", pd.DataFrame(
        [(i, start, end) for i, (start, end) in enumerate(design.covariate_windows)],
        columns=["window_id", "start_day", "end_day"]), {"window_id": "INTEGER",
                                                         "start_day": "INTEGER",
                                                         "end_day": "INTEGER"})
    _register(con, "cf_covariate_analysis", analyses.drop(columns=["description"]),
              {"analysis": "VARCHAR", "kind": "VARCHAR", "band": "VARCHAR",
               "covariate_id": "VARCHAR"})
    drug = domain_records(source, "drug")
    rolled_up = "drug" in domains and drug[1] == "drug_exposure"
    if rolled_up:
        notes += _drug_ingredients(source, vocabulary)
    notes += _arm_exclusion(source, vocabulary)
    params: dict[str, object] = {}
    ctes: list[str] = []
    concept_parts: list[str] = []  # may repeat a covariate (several records): DISTINCT
    entry_parts: list[str] = []    # one row per entry and covariate by construction
    for domain, records in DOMAIN_RECORDS.items():
        if domain in domains:
            code, table, concept, start, end = (
                domain_records(source, domain) if domain == "drug" else records)
            concept_parts.append(_concept_part(code, table, concept, start, end,
                                               rolled_up=rolled_up and domain == "drug"))
    if "visit" in domains:
        _register(con, "cf_visit_band", pd.DataFrame(
            list(VISIT_BANDS), columns=["code", "low", "high", "label"]), {})
        entry_parts.append(_visit_part(domain_records(source, "visit")[4]))
    if "charlson" in domains:
        notes += _charlson_tables(source, vocabulary)
        ctes.append(CHARLSON_CTES)
        entry_parts.append(CHARLSON_PART)
        params["charlson_end_day"] = charlson_end_day(design)
    demographics = DEMOGRAPHICS_PART if "demographics" in domains else None
    if design.disease is not None:
        entry_parts.append(DISEASE_PART)
    if concept_parts:
        union = " UNION ALL ".join(f"({part})" for part in concept_parts)
        entry_parts.insert(0, f"SELECT DISTINCT entry_id, covariate_id FROM ({union})")
    if not entry_parts:
        entry_parts.append("SELECT NULL::BIGINT AS entry_id, NULL::BIGINT AS covariate_id "
                           "WHERE false")
    _entries(con)
    ctes.append("entry_covariate AS ("
                + " UNION ALL ".join(f"({part})" for part in entry_parts) + ")")
    # Covariates are found once per cohort entry (person and time zero, shared by the
    # comparisons that give a person the same time zero) and kept at that level: the workspace
    # holds them once per entry, and each comparison's rows point at their entry (entry_id).
    # The arm exclusion and the prevalence floor, which depend on the comparison, apply when a
    # comparison is loaded (cohort.comparison_data), or in the cf_covariate view.
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_entry_covariate AS
        WITH {', '.join(ctes)}
        SELECT entry_id, covariate_id::BIGINT AS covariate_id FROM entry_covariate
        {"UNION ALL " + demographics if demographics else ""}
    """, params or None)
    _register(con, "cf_covariate_setting", pd.DataFrame(
        {"min_prevalence": [float(design.min_prevalence)]}), {"min_prevalence": "DOUBLE"})
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW cf_covariate AS
        WITH expanded AS (
            SELECT h.comparison_id, h.row_id, e.covariate_id
            FROM cf_entry_covariate e JOIN cf_cohort h ON h.entry_id = e.entry_id
            WHERE e.covariate_id % 1000 >= {FIRST_VALUE_ANALYSIS} OR NOT EXISTS (
                SELECT 1 FROM cf_arm_exclusion x
                WHERE x.comparison_id = h.comparison_id
                  AND x.concept_id = e.covariate_id // 1000)
        ), size AS (SELECT comparison_id, count(*) AS n FROM cf_cohort GROUP BY comparison_id),
        prevalence AS (
            SELECT comparison_id, covariate_id, count(*) AS persons
            FROM expanded GROUP BY comparison_id, covariate_id
        )
        SELECT a.comparison_id, a.row_id, a.covariate_id
        FROM expanded a
        JOIN prevalence p USING (comparison_id, covariate_id)
        JOIN size s USING (comparison_id)
        WHERE p.persons >= greatest(1, (SELECT min_prevalence FROM cf_covariate_setting) * s.n)
    """)
    con.execute("DROP TABLE cf_covariate_entry")
    reference = _reference(source)
    if warnings is not None:
        warnings.extend(notes)
    return reference


def _entries(con: duckdb.DuckDBPyConnection) -> None:
    """cf_covariate_entry(entry_id, person_id, index_date, year_of_birth, gender_concept_id,
    disease_onset): each distinct cohort entry once, numbered by person; cf_cohort gains its
    rows' entry_id."""
    columns = [row[0] for row in con.execute("DESCRIBE cf_cohort").fetchall()]
    onset = ("any_value(disease_onset)" if "disease_onset" in columns else "NULL::DATE")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_covariate_entry AS
        SELECT (row_number() OVER (ORDER BY person_id, index_date))::BIGINT AS entry_id,
               person_id, index_date, year_of_birth, gender_concept_id, disease_onset
        FROM (SELECT person_id, index_date, any_value(year_of_birth) AS year_of_birth,
                     any_value(gender_concept_id) AS gender_concept_id,
                     {onset} AS disease_onset
              FROM cf_cohort GROUP BY person_id, index_date)
    """)
    kept = "h.* EXCLUDE (entry_id)" if "entry_id" in columns else "h.*"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_cohort AS
        SELECT {kept}, e.entry_id
        FROM cf_cohort h JOIN cf_covariate_entry e USING (person_id, index_date)
        ORDER BY h.comparison_id, h.row_id
    """)


def _register(
    con: duckdb.DuckDBPyConnection, name: str, frame: pd.DataFrame, types: dict[str, str]
) -> None:
    """Copy a pandas frame into temp table `name` (column types cast where given)."""
    con.register(f"{name}_input", frame)
    columns = ", ".join(f"{c}::{types[c]} AS {c}" if c in types else c for c in frame.columns)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT {columns} FROM {name}_input")
    con.unregister(f"{name}_input")


@dataclass(frozen=True)
class _Vocabulary:
    ancestry: bool     # concept_ancestor has rows
    ingredients: bool  # ancestry, and concept has concept_class_id to find ingredients


def _vocabulary(source: RecordSource) -> _Vocabulary:
    ancestry = source.has_rows("concept_ancestor")
    classes = "concept_class_id" in source.tables.get("concept", []) and source.has_rows(
        "concept")
    return _Vocabulary(ancestry, ancestry and classes)


def _drug_ingredients(source: RecordSource, vocabulary: _Vocabulary) -> list[str]:
    """Temp table cf_drug_ingredient(drug_concept_id, ingredient_concept_id, fallback_records):
    each drug_exposure concept's ingredients, or itself (fallback) when it has none."""
    rolled = (f"SELECT u.drug_concept_id, i.ingredient_concept_id FROM used u "
              f"JOIN ({INGREDIENT_OF}) i ON i.concept_id = u.drug_concept_id"
              if vocabulary.ingredients else
              "SELECT NULL::BIGINT AS drug_concept_id, NULL::BIGINT AS ingredient_concept_id "
              "WHERE false")
    source.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_drug_ingredient AS
        WITH used AS (
            SELECT drug_concept_id, count(*) AS records FROM drug_exposure
            WHERE drug_concept_id IS NOT NULL AND drug_concept_id <> 0 GROUP BY drug_concept_id
        ), rolled AS ({rolled})
        SELECT drug_concept_id::BIGINT AS drug_concept_id,
               ingredient_concept_id::BIGINT AS ingredient_concept_id,
               NULL::BIGINT AS fallback_records
        FROM rolled
        UNION ALL
        SELECT drug_concept_id, drug_concept_id, records FROM used
        WHERE drug_concept_id NOT IN (SELECT drug_concept_id FROM rolled)
    """)
    concepts, records, examples = source.con.execute("""
        SELECT count(*), coalesce(sum(fallback_records), 0),
               list(drug_concept_id ORDER BY fallback_records DESC, drug_concept_id)[1:5]
        FROM cf_drug_ingredient WHERE fallback_records IS NOT NULL
    """).fetchall()[0]
    if not concepts:
        return []
    listed = ", ".join(str(c) for c in examples) + (", ..." if concepts > len(examples) else "")
    if not vocabulary.ingredients:
        return [f"drug covariates: drug_era is empty and the vocabulary cannot roll "
                f"drug_exposure up to ingredients (concept_ancestor empty or concept lacks "
                f"concept_class_id): all {concepts} drug concept(s) ({records} records) are "
                f"covariates at their own, product-level id ({listed})"]
    return [f"drug covariates: drug_era is empty, so drug_exposure is rolled up to ingredients; "
            f"{concepts} drug concept(s) ({records} records) have no ingredient ancestor and "
            f"are covariates at their own id ({listed})"]


def _arm_exclusion(source: RecordSource, vocabulary: _Vocabulary) -> list[str]:
    """Temp table cf_arm_exclusion(comparison_id, concept_id): never covariates there.

    The arms' concepts, their descendants, and the arms' own ingredients: those of the arm's
    single-ingredient concepts (a celecoxib arm whose descendants include an amlodipine +
    celecoxib product excludes celecoxib, not amlodipine), or all ingredients of an arm made
    only of combination products.
    """
    descendants = ("UNION SELECT a.comparison_id, a.treated, ca.descendant_concept_id "
                   "FROM arm a JOIN concept_ancestor ca ON ca.ancestor_concept_id = a.concept_id"
                   if vocabulary.ancestry else "")
    ingredients = (f"""
        UNION
        SELECT comparison_id, ingredient_concept_id FROM (
            SELECT w.comparison_id, w.treated, w.concept_id, i.ingredient_concept_id,
                   count(*) OVER (PARTITION BY w.comparison_id, w.treated, w.concept_id)
                       AS n_ingredients
            FROM widened w JOIN ({INGREDIENT_OF}) i ON i.concept_id = w.concept_id
        ) QUALIFY n_ingredients = 1
               OR min(n_ingredients) OVER (PARTITION BY comparison_id, treated) > 1
    """ if vocabulary.ingredients else "")
    source.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_arm_exclusion AS
        WITH arm AS (SELECT DISTINCT comparison_id, treated, concept_id FROM cf_arm_concept),
        widened AS (SELECT comparison_id, treated, concept_id FROM arm {descendants})
        SELECT comparison_id, concept_id FROM widened
        {ingredients}
    """)
    if vocabulary.ancestry:
        return []
    return ["covariates: the source's concept_ancestor table is empty, so only the arms' own "
            "concepts (not their descendants or ingredients) are kept out of the covariates"]


def _concept_part(code: int, table: str, concept: str, start: str, end: str | None,
                  rolled_up: bool) -> str:
    """Covariates of one concept domain in every window (constant names only reach the SQL)."""
    value = "m.ingredient_concept_id" if rolled_up else f"r.{concept}::BIGINT"
    mapping = ("JOIN cf_drug_ingredient m ON m.drug_concept_id = r.drug_concept_id"
               if rolled_up else "")
    return f"""
        SELECT h.entry_id, {value} * 1000 + {code * 10} + w.window_id AS covariate_id
        FROM cf_covariate_entry h
        JOIN {table} r ON r.person_id = h.person_id
        {mapping}
        JOIN cf_covariate_window w
          ON r.{start}::DATE <= h.index_date + w.end_day
         AND {_end_expression(start, end)} >= h.index_date + w.start_day
        WHERE r.{concept} IS NOT NULL AND r.{concept} <> 0
    """


def _end_expression(start: str, end: str | None) -> str:
    """A record's last day: its end column (when not before its start), else its start."""
    if end is None:
        return f"r.{start}::DATE"
    return f"coalesce(greatest(r.{end}::DATE, r.{start}::DATE), r.{start}::DATE)"


def _visit_part(end: str | None) -> str:
    """Visits per visit concept and window, as one band covariate (FE's VisitConceptCount)."""
    return f"""
        SELECT v.entry_id, v.visit_concept_id::BIGINT * 1000 + b.code * 10 + v.window_id
            AS covariate_id
        FROM (
            SELECT h.entry_id, r.visit_concept_id, w.window_id, count(*) AS visits
            FROM cf_covariate_entry h
            JOIN visit_occurrence r ON r.person_id = h.person_id
            JOIN cf_covariate_window w
              ON r.visit_start_date::DATE <= h.index_date + w.end_day
             AND {_end_expression("visit_start_date", end)} >= h.index_date + w.start_day
            WHERE r.visit_concept_id IS NOT NULL AND r.visit_concept_id <> 0
            GROUP BY h.entry_id, r.visit_concept_id, w.window_id
        ) v
        JOIN cf_visit_band b ON v.visits >= b.low AND (b.high IS NULL OR v.visits <= b.high)
    """


def _charlson_tables(source: RecordSource, vocabulary: _Vocabulary) -> list[str]:
    """Temp tables cf_charlson_category, cf_charlson_band and cf_charlson_concept."""
    con = source.con
    _register(con, "cf_charlson_category", pd.DataFrame(
        [(c.category_id, c.name, c.weight, c.replaced_by if CHARLSON_HIERARCHY else None)
         for c in CHARLSON_CATEGORIES],
        columns=["category_id", "name", "weight", "replaced_by"]), {"replaced_by": "INTEGER"})
    _register(con, "cf_charlson_band", pd.DataFrame(
        list(CHARLSON_BANDS), columns=["value", "low", "high", "label"]), {"high": "INTEGER"})
    _register(con, "cf_charlson_ancestor", pd.DataFrame(
        [(c.category_id, a) for c in CHARLSON_CATEGORIES for a in c.ancestors],
        columns=["category_id", "ancestor_concept_id"]), {"ancestor_concept_id": "BIGINT"})
    descendants = ("UNION SELECT a.category_id, ca.descendant_concept_id FROM "
                   "cf_charlson_ancestor a JOIN concept_ancestor ca "
                   "ON ca.ancestor_concept_id = a.ancestor_concept_id"
                   if vocabulary.ancestry else "")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_charlson_concept AS
        SELECT category_id, ancestor_concept_id AS concept_id FROM cf_charlson_ancestor
        {descendants}
    """)
    if vocabulary.ancestry:
        return []
    return ["Charlson index: the source's concept_ancestor table is empty, so each category "
            "matches only its listed ancestor concepts (scores are likely too low)"]


# Categories present per entry (MATERIALIZED: read three times), and the score with the
# hierarchy applied through cf_charlson_category.replaced_by.
CHARLSON_CTES = """
    charlson_present AS MATERIALIZED (
        SELECT DISTINCT h.entry_id, k.category_id
        FROM cf_covariate_entry h
        JOIN condition_occurrence r ON r.person_id = h.person_id
        JOIN cf_charlson_concept k ON k.concept_id = r.condition_concept_id
        WHERE r.condition_start_date::DATE <= h.index_date + ($charlson_end_day)::INTEGER
    ),
    charlson_score AS (
        SELECT h.entry_id,
               coalesce(sum(g.weight) FILTER (WHERE s.category_id IS NULL), 0) AS score
        FROM cf_covariate_entry h
        LEFT JOIN charlson_present p ON p.entry_id = h.entry_id
        LEFT JOIN cf_charlson_category g ON g.category_id = p.category_id
        LEFT JOIN charlson_present s
               ON s.entry_id = p.entry_id AND s.category_id = g.replaced_by
        GROUP BY h.entry_id
    )
"""
CHARLSON_PART = f"""
    SELECT c.entry_id, b.value::BIGINT * 1000 + {CHARLSON_SCORE} AS covariate_id
    FROM charlson_score c
    JOIN cf_charlson_band b ON c.score >= b.low AND (b.high IS NULL OR c.score <= b.high)
    UNION ALL
    SELECT entry_id, category_id::BIGINT * 1000 + {CHARLSON_CATEGORY} FROM charlson_present
"""
DEMOGRAPHICS_PART = f"""
    SELECT entry_id, gender_concept_id::BIGINT * 1000 + {SEX} AS covariate_id
    FROM cf_covariate_entry WHERE gender_concept_id IS NOT NULL AND gender_concept_id <> 0
    UNION ALL
    SELECT entry_id,
           greatest(floor((year(index_date) - year_of_birth) / 5), 0)::BIGINT * 1000
           + {AGE_GROUP}
    FROM cf_covariate_entry WHERE year_of_birth IS NOT NULL
    UNION ALL
    SELECT entry_id, year(index_date)::BIGINT * 1000 + {INDEX_YEAR} FROM cf_covariate_entry
    UNION ALL
    SELECT entry_id, month(index_date)::BIGINT * 1000 + {INDEX_MONTH} FROM cf_covariate_entry
"""


DISEASE_PART = f"""
    SELECT entry_id,
           CASE {" ".join(f"WHEN days <= {high} THEN {value}" for value, _low, high, _label
                          in DISEASE_BANDS if high is not None)}
                ELSE {DISEASE_BANDS[-1][0]} END::BIGINT * 1000 + {DISEASE_DURATION}
               AS covariate_id
    FROM (SELECT entry_id, datediff('day', disease_onset, index_date) AS days
          FROM cf_covariate_entry WHERE disease_onset IS NOT NULL AND disease_onset <= index_date)
"""


def _reference(source: RecordSource) -> pd.DataFrame:
    """covariate_ref for the ids in cf_covariate, named from cf_covariate_analysis."""
    con = source.con
    labels = pd.DataFrame(
        [(CHARLSON_SCORE, value, label) for value, _low, _high, label in CHARLSON_BANDS]
        + [(CHARLSON_CATEGORY, c.category_id, c.name) for c in CHARLSON_CATEGORIES]
        + [(INDEX_MONTH, month, name) for month, name in enumerate(MONTHS, start=1)]
        + [(DISEASE_DURATION, value, label) for value, _low, _high, label in DISEASE_BANDS],
        columns=["analysis_id", "value", "label"])
    _register(con, "cf_covariate_value_label", labels, {"value": "BIGINT"})
    reference = con.execute(f"""
        WITH ids AS (SELECT DISTINCT covariate_id FROM cf_entry_covariate),
        parsed AS (
            SELECT covariate_id, covariate_id // 1000 AS value,
                   (covariate_id % 1000)::INTEGER AS analysis_id
            FROM ids
        ), names AS ({concept_names(source)})
        SELECT p.covariate_id,
               CASE a.kind
                   WHEN 'concept' THEN a.analysis || ' in [' || a.window_start::VARCHAR || ', '
                        || a.window_end::VARCHAR || ']: '
                        || coalesce(n.concept_name, 'concept ' || p.value::VARCHAR)
                   WHEN 'visit' THEN 'visits in [' || a.window_start::VARCHAR || ', '
                        || a.window_end::VARCHAR || ']: '
                        || coalesce(n.concept_name, 'visit concept ' || p.value::VARCHAR)
                        || ', ' || a.band
                   WHEN 'sex' THEN 'sex = ' || coalesce(n.concept_name, p.value::VARCHAR)
                   WHEN 'age_group' THEN 'age group: ' || (p.value * 5)::VARCHAR || '-'
                        || (p.value * 5 + 4)::VARCHAR
                   WHEN 'index_year' THEN 'index year: ' || p.value::VARCHAR
                   WHEN 'index_month' THEN 'index month: ' || coalesce(l.label, p.value::VARCHAR)
                   WHEN 'disease_duration' THEN 'days since the first diagnosis: '
                        || coalesce(l.label, p.value::VARCHAR)
                   WHEN 'charlson_score' THEN 'Charlson index (Romano), conditions up to day '
                        || a.window_end::VARCHAR || ': ' || coalesce(l.label, p.value::VARCHAR)
                   WHEN 'charlson_category' THEN 'Charlson category, conditions up to day '
                        || a.window_end::VARCHAR || ': ' || coalesce(l.label, p.value::VARCHAR)
                   ELSE 'covariate ' || p.covariate_id::VARCHAR
               END AS covariate_name,
               a.analysis,
               CASE WHEN a.kind IN ('concept', 'visit', 'sex') THEN p.value END AS concept_id,
               a.window_start::INTEGER AS window_start, a.window_end::INTEGER AS window_end
        FROM parsed p
        LEFT JOIN cf_covariate_analysis a ON a.analysis_id = p.analysis_id
        LEFT JOIN names n ON n.concept_id = p.value AND a.kind IN ('concept', 'visit', 'sex')
        LEFT JOIN cf_covariate_value_label l
               ON l.analysis_id = p.analysis_id AND l.value = p.value
        ORDER BY p.covariate_id
    """).df()
    con.execute("DROP TABLE cf_covariate_value_label")
    return reference

