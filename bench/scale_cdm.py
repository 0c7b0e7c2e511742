"""A national-scale synthetic OMOP CDM v5.3 for benchmarks, generated set-based in DuckDB SQL.

`python -m bench.scale_cdm [--persons N] [--seed S] [--out DIR]` (normally reached through
`bench.cohorts`, which caches the result under data/bench/).

Shape, per 1,000,000 persons (everything scales linearly with `persons`):
  - person: sex, year of birth 1930-2004; one observation period each, starting 2005-2014 and
    lasting 2-13 years (ending by 2022-12-31);
  - condition_occurrence: ~40M records over 4,500 condition concepts (Zipf-like frequencies),
    dated uniformly inside the observation period; among them 20 outcome and 50 negative-control
    concepts (`OUTCOME_IDS`, `NEGATIVE_CONTROL_IDS`) at ranks spread from common to rare;
  - drug_era (ingredient level): ~18M eras over 1,700 noise ingredients (Zipf-like), plus eras
    of one shared comparator (~8% of persons) and 100 candidate drugs whose ever-user shares
    are log-spaced from 0.03% to 4% (so 300 to 40,000 users each): ~60M drug and condition
    records in all;
  - procedure_occurrence and measurement: ~2M records each (500 and 200 concepts);
  - concept (names, domains; ~7,000 clinical concepts; ATC-like classes: the candidates in 9
    2nd-level classes under one group, the noise ingredients and the comparator under another),
    concept_ancestor (self rows and the class hierarchy), an empty
    drug_exposure, observation, death, visit_occurrence and concept_relationship, cdm_source.
A latent per-person frailty (log-normal, mean 1) multiplies both the record counts and the
chance of using each study drug, so users have denser histories than non-users (a little
confounding, as in real data). No effects are planted: this is for measuring speed and memory.

Randomness is DuckDB's `hash()` of (record key, stream, seed), so the data are a deterministic
function of (persons, seed, GENERATOR_VERSION, DuckDB version):
the same set of rows comes out whatever the thread count (row order inside a file is not fixed:
keeping insertion order doubled the write time). Each table is written with `COPY ... TO ...
(FORMAT parquet, COMPRESSION zstd)`; the small tables carry every CDM v5.3 column
(`cohort.synthetic.CDM_SCHEMA`, NULL where not generated), the four record tables only their
id, person, concept, date(s) and type columns (all-NULL columns cost ~30% more write time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import duckdb

from cohort.synthetic import CDM_SCHEMA

GENERATOR_VERSION = 2
"""Bumped whenever the same size and seed would produce different data (the cache key).
2: ATC classes in the vocabulary (records unchanged)."""
VOCABULARY_ID = "Cohortflow Bench"
GENDER_MALE, GENDER_FEMALE = 8507, 8532
_BASE = 2_000_000_000  # OMOP local concept ids

N_CONDITIONS, N_NOISE_DRUGS, N_PROCEDURES, N_MEASUREMENTS = 4_500, 1_700, 500, 200
N_CANDIDATES = 100
CONDITION_BASE = _BASE + 100_000
COMPARATOR_ID = _BASE + 200_000
CANDIDATE_IDS = tuple(COMPARATOR_ID + 1 + i for i in range(N_CANDIDATES))
NOISE_DRUG_BASE = _BASE + 201_000
PROCEDURE_BASE = _BASE + 300_000
MEASUREMENT_BASE = _BASE + 400_000
# Condition ranks (0 = most frequent) of the outcomes and negative controls: common to rare.
OUTCOME_IDS = tuple(CONDITION_BASE + 40 + 60 * k for k in range(20))
NEGATIVE_CONTROL_IDS = tuple(CONDITION_BASE + 70 + 60 * k for k in range(50))
# ATC-like classes for battery screens: the candidates in N_CLASSES 2nd-level classes (candidate
# i in class i % N_CLASSES, so every class has at least 11 members) under one 1st-level group;
# the noise ingredients and the comparator under a group of their own, which a screen excludes.
N_CLASSES = 9
ATC_BASE = _BASE + 500_000
CANDIDATE_GROUP_ID, NOISE_GROUP_ID = ATC_BASE, ATC_BASE + 1
CLASS_IDS = tuple(ATC_BASE + 10 + k for k in range(N_CLASSES))

COMPARATOR_SHARE = 0.08
CANDIDATE_SHARES = (3e-4, 4e-2)  # ever-user shares of the rarest and the commonest candidate
CONDITIONS_PER_PERSON, NOISE_ERAS_PER_PERSON = 40.0, 18.0
PROCEDURES_PER_PERSON, MEASUREMENTS_PER_PERSON = 2.0, 2.0
MAX_RECORDS = 999  # per person and table (record ids are person_id * 1000 + k)


def candidate_share(index: int) -> float:
    """Ever-user share of candidate `index` (0-based): log-spaced over CANDIDATE_SHARES."""
    low, high = CANDIDATE_SHARES
    return low * (high / low) ** (index / (N_CANDIDATES - 1))


def concept_name(concept_id: int) -> str:
    """The concept name the generator gives a study concept (drug, outcome, control)."""
    if concept_id == COMPARATOR_ID:
        return "comparator"
    if concept_id in CANDIDATE_IDS:
        return f"candidate_{CANDIDATE_IDS.index(concept_id) + 1:03d}"
    if concept_id in OUTCOME_IDS:
        return f"outcome_{OUTCOME_IDS.index(concept_id) + 1:02d}"
    if concept_id in NEGATIVE_CONTROL_IDS:
        return f"negative_control_{NEGATIVE_CONTROL_IDS.index(concept_id) + 1:02d}"
    raise KeyError(concept_id)


def _macros(con: duckdb.DuckDBPyConnection, seed: int) -> None:
    seed = int(seed)  # an int literal is the only value formatted into SQL here
    con.execute(f"""
        CREATE OR REPLACE TEMP MACRO u(key, stream) AS
            ((hash(key, stream, {seed}::BIGINT) >> 11)::DOUBLE + 0.5) / 9007199254740992.0
    """)
    # exponential(1) and standard normal (Box-Muller) draws from the same streams
    con.execute("CREATE OR REPLACE TEMP MACRO expo(key, stream) AS -ln(u(key, stream))")
    con.execute("""
        CREATE OR REPLACE TEMP MACRO normal(key, stream) AS
            sqrt(-2 * ln(u(key, stream))) * cos(2 * pi() * u(key, stream + 1))
    """)


LEAN_TABLES = ("condition_occurrence", "drug_era", "procedure_occurrence", "measurement")


def _full_columns(table: str, generated: dict[str, str]) -> str:
    """SELECT list of `table`'s CDM v5.3 columns, in schema order: generated SQL or a typed
    NULL (record tables: the generated columns only)."""
    columns = []
    for name, kind in CDM_SCHEMA[table]:
        if name in generated:
            columns.append(f"({generated[name]})::{kind} AS {name}")
        elif table not in LEAN_TABLES:
            columns.append(f"NULL::{kind} AS {name}")
    unknown = set(generated) - {name for name, _ in CDM_SCHEMA[table]}
    if unknown:
        raise ValueError(f"{table}: not CDM columns: {sorted(unknown)}")
    return ", ".join(columns)


def _copy(con: duckdb.DuckDBPyConnection, folder: Path, table: str, generated: dict[str, str],
          source: str) -> None:
    target = str(folder / f"{table}.parquet").replace("'", "''")
    con.execute(f"COPY (SELECT {_full_columns(table, generated)} FROM {source}) "
                f"TO '{target}' (FORMAT parquet, COMPRESSION zstd)")


def _records(count: str, mean: float, stream: int) -> str:
    """Persons unnested to `k` = 0..n-1 records each; n rises with frailty, heavy-tailed."""
    return f"""(
        SELECT p.*, unnest(range(n)) AS k FROM (
            SELECT *, least({MAX_RECORDS}, floor({mean} * frailty
                       * (0.3 + 0.7 * expo(person_id, {stream}))))::INTEGER AS n
            FROM bench_person) p
        WHERE n > 0) {count}"""


def generate_scale_cdm(folder: Path, *, persons: int, seed: int = 0,
                       threads: int | None = None, memory_limit: str | None = None) -> dict:
    """Write the CDM into `folder` (replaced if present); return sizes and seconds."""
    if persons < 1:
        raise ValueError("persons must be >= 1")
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    con = duckdb.connect()
    if threads:
        con.execute("SET threads = ?", [threads])
    if memory_limit:
        con.execute("SET memory_limit = ?", [memory_limit])
    con.execute("SET preserve_insertion_order = false")  # 2x faster COPY; see the docstring
    _macros(con, seed)
    con.execute(f"""
        CREATE TEMP TABLE bench_person AS
        SELECT person_id,
               CASE WHEN u(person_id, 1) < 0.49 THEN {GENDER_MALE} ELSE {GENDER_FEMALE} END
                   AS gender_concept_id,
               1930 + floor(75 * u(person_id, 2))::INTEGER AS year_of_birth,
               DATE '2005-01-01' + floor(3650 * u(person_id, 3))::INTEGER AS op_start,
               least(op_start + 730 + floor(4000 * u(person_id, 4))::INTEGER,
                     DATE '2022-12-31') AS op_end,
               datediff('day', op_start, op_end) + 1 AS span,
               exp(0.5 * normal(person_id, 5) - 0.125) AS frailty
        FROM range(1, {int(persons)} + 1) t(person_id)
    """)
    _copy(con, folder, "person", {
        "person_id": "person_id", "gender_concept_id": "gender_concept_id",
        "year_of_birth": "year_of_birth", "race_concept_id": "0", "ethnicity_concept_id": "0",
        "gender_source_value": f"CASE WHEN gender_concept_id = {GENDER_MALE} THEN 'M' ELSE 'F' END",
    }, "bench_person")
    _copy(con, folder, "observation_period", {
        "observation_period_id": "person_id", "person_id": "person_id",
        "observation_period_start_date": "op_start", "observation_period_end_date": "op_end",
        "period_type_concept_id": "32817",
    }, "bench_person")

    def dated(alias: str, mean: float, stream: int) -> str:
        """Records with a day drawn once (stream + 2) uniformly inside the observation."""
        return (f"(SELECT *, op_start + floor(span * u(person_id * 1000 + k, {stream + 2}))"
                f"::INTEGER AS day FROM {_records(alias, mean, stream)})")

    _copy(con, folder, "condition_occurrence", {
        "condition_occurrence_id": "person_id * 1000 + k", "person_id": "person_id",
        "condition_concept_id":
            f"{CONDITION_BASE} + floor({N_CONDITIONS} * pow(u(person_id * 1000 + k, 11), 2.5))",
        "condition_start_date": "day", "condition_end_date": "day",
        "condition_type_concept_id": "32817",
    }, dated("c", CONDITIONS_PER_PERSON, 10))

    # study drugs: users of each of comparator (index 0) and candidates (1..100)
    shares = [(0, COMPARATOR_ID, COMPARATOR_SHARE)] + [
        (i + 1, cid, candidate_share(i)) for i, cid in enumerate(CANDIDATE_IDS)]
    con.execute("CREATE TEMP TABLE bench_study_drug (drug INTEGER, concept_id BIGINT, "
                "share DOUBLE)")
    con.executemany("INSERT INTO bench_study_drug VALUES (?, ?, ?)", shares)
    con.execute("""
        CREATE TEMP TABLE bench_user AS
        SELECT p.person_id, p.op_start, p.op_end, p.span, d.drug, d.concept_id,
               p.person_id * 128 + d.drug AS user_key
        FROM bench_person p CROSS JOIN bench_study_drug d
        WHERE u(p.person_id * 128 + d.drug, 20) < d.share * p.frailty
    """)
    # 1-4 eras per user, the first anywhere in observation, later ones ~6 months apart;
    # era lengths 30-day multiples with a heavy tail. Noise eras: each draws its ingredient
    # and start independently (a person may have several, even overlapping, eras of one).
    era_length = "30 * (1 + floor(2 * expo({key}, {stream})))::INTEGER"
    study = f"""(
        SELECT person_id, concept_id AS drug_concept_id, start_date,
               least(start_date + {era_length.format(key='era_key', stream=24)} - 1, op_end)
                   AS end_date, 1000 + drug * 4 + k AS record
        FROM (
            SELECT *, user_key * 4 + k AS era_key,
                   op_start + floor(span * u(user_key, 22))::INTEGER
                       + (k * (150 + floor(60 * u(user_key * 4 + k, 23))))::INTEGER AS start_date
            FROM (SELECT *, unnest(range(1 + least(3, floor(0.6 * expo(user_key, 21))::INTEGER)))
                     AS k FROM bench_user))
        WHERE start_date <= op_end)"""
    noise = f"""(
        SELECT person_id,
               {NOISE_DRUG_BASE} + floor({N_NOISE_DRUGS} * pow(u(person_id * 1000 + k, 31), 2.0))
                   AS drug_concept_id, start_date,
               least(start_date + {era_length.format(key='person_id * 1000 + k', stream=33)}
                     - 1, op_end) AS end_date, k AS record
        FROM (SELECT *, op_start + floor(span * u(person_id * 1000 + k, 32))::INTEGER
                  AS start_date FROM {_records('n', NOISE_ERAS_PER_PERSON, 30)}))"""
    _copy(con, folder, "drug_era", {
        "drug_era_id": "person_id * 2000 + record", "person_id": "person_id",
        "drug_concept_id": "drug_concept_id", "drug_era_start_date": "start_date",
        "drug_era_end_date": "end_date", "drug_exposure_count": "1", "gap_days": "0",
    }, f"(SELECT * FROM {noise} UNION ALL SELECT * FROM {study})")

    _copy(con, folder, "procedure_occurrence", {
        "procedure_occurrence_id": "person_id * 1000 + k", "person_id": "person_id",
        "procedure_concept_id":
            f"{PROCEDURE_BASE} + floor({N_PROCEDURES} * pow(u(person_id * 1000 + k, 41), 2.0))",
        "procedure_date": "day", "procedure_type_concept_id": "32817",
    }, dated("pr", PROCEDURES_PER_PERSON, 40))
    _copy(con, folder, "measurement", {
        "measurement_id": "person_id * 1000 + k", "person_id": "person_id",
        "measurement_concept_id":
            f"{MEASUREMENT_BASE} + floor({N_MEASUREMENTS} * pow(u(person_id * 1000 + k, 51), "
            "1.5))",
        "measurement_date": "day", "measurement_type_concept_id": "32817",
        "value_as_number": "round(100 * exp(0.3 * normal(person_id * 1000 + k, 53)), 1)",
    }, dated("m", MEASUREMENTS_PER_PERSON, 50))
    for empty in ("drug_exposure", "observation", "death", "visit_occurrence",
                  "concept_relationship"):
        _copy(con, folder, empty, {}, "(SELECT 1 WHERE false)")

    _write_vocabulary(con, folder, persons, seed)
    rows = {table: con.execute(f"SELECT count(*) FROM '{folder / table}.parquet'").fetchall()[0][0]
            for table in ("person", "condition_occurrence", "drug_era", "procedure_occurrence",
                          "measurement", "concept")}
    con.close()
    info = {
        "generator": "bench.scale_cdm", "generator_version": GENERATOR_VERSION,
        "duckdb_version": duckdb.__version__, "persons": persons, "seed": seed, "rows": rows,
        "bytes": sum(f.stat().st_size for f in folder.glob("*.parquet")),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (folder / "generator.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _write_vocabulary(con: duckdb.DuckDBPyConnection, folder: Path, persons: int,
                      seed: int) -> None:
    names = {cid: concept_name(cid) for cid in (COMPARATOR_ID, *CANDIDATE_IDS, *OUTCOME_IDS,
                                                *NEGATIVE_CONTROL_IDS)}
    con.execute("CREATE TEMP TABLE bench_named (concept_id BIGINT, concept_name VARCHAR)")
    con.executemany("INSERT INTO bench_named VALUES (?, ?)", list(names.items()))
    con.execute(f"""
        CREATE TEMP TABLE bench_concept AS
        SELECT c.concept_id, coalesce(n.concept_name, c.generic_name) AS concept_name,
               c.domain_id, c.concept_class_id
        FROM (
            SELECT {CONDITION_BASE} + i AS concept_id,
                   'condition ' || lpad((i + 1)::VARCHAR, 4, '0') AS generic_name,
                   'Condition' AS domain_id, 'Clinical Finding' AS concept_class_id
            FROM range({N_CONDITIONS}) t(i)
            UNION ALL SELECT {COMPARATOR_ID} + i, 'study drug ' || i::VARCHAR, 'Drug',
                             'Ingredient' FROM range({N_CANDIDATES + 1}) t(i)
            UNION ALL SELECT {NOISE_DRUG_BASE} + i,
                             'ingredient ' || lpad((i + 1)::VARCHAR, 4, '0'), 'Drug',
                             'Ingredient' FROM range({N_NOISE_DRUGS}) t(i)
            UNION ALL SELECT {PROCEDURE_BASE} + i,
                             'procedure ' || lpad((i + 1)::VARCHAR, 3, '0'), 'Procedure',
                             'Procedure' FROM range({N_PROCEDURES}) t(i)
            UNION ALL SELECT {MEASUREMENT_BASE} + i,
                             'measurement ' || lpad((i + 1)::VARCHAR, 3, '0'), 'Measurement',
                             'Lab Test' FROM range({N_MEASUREMENTS}) t(i)
            UNION ALL SELECT {CANDIDATE_GROUP_ID}, 'candidate drugs', 'Drug', 'ATC 1st'
            UNION ALL SELECT {NOISE_GROUP_ID}, 'other drugs', 'Drug', 'ATC 1st'
            UNION ALL SELECT {CLASS_IDS[0]} + i, 'candidate class ' || (i + 1)::VARCHAR,
                             'Drug', 'ATC 2nd' FROM range({N_CLASSES}) t(i)
            UNION ALL SELECT {GENDER_MALE}, 'MALE', 'Gender', 'Gender'
            UNION ALL SELECT {GENDER_FEMALE}, 'FEMALE', 'Gender', 'Gender'
            UNION ALL SELECT 32817, 'EHR', 'Type Concept', 'Type Concept'
        ) c LEFT JOIN bench_named n USING (concept_id)
        ORDER BY c.concept_id
    """)
    _copy(con, folder, "concept", {
        "concept_id": "concept_id", "concept_name": "concept_name", "domain_id": "domain_id",
        "vocabulary_id": "CASE WHEN concept_class_id LIKE 'ATC %' THEN 'ATC' "
                         f"WHEN concept_id >= {_BASE} THEN '{VOCABULARY_ID}' "
                         "WHEN domain_id = 'Gender' THEN 'Gender' ELSE 'Type Concept' END",
        "concept_class_id": "concept_class_id",
        "standard_concept": "CASE WHEN concept_class_id LIKE 'ATC %' THEN 'C' ELSE 'S' END",
        "concept_code": f"CASE WHEN concept_id >= {_BASE} THEN 'CB' || (concept_id - {_BASE})"
                        "::VARCHAR ELSE concept_id::VARCHAR END",
        "valid_start_date": "DATE '1970-01-01'", "valid_end_date": "DATE '2099-12-31'",
    }, "bench_concept")
    con.execute(f"""
        CREATE TEMP TABLE bench_ancestor AS
        SELECT concept_id AS ancestor, concept_id AS descendant, 0 AS levels FROM bench_concept
        UNION ALL SELECT {CLASS_IDS[0]} + i % {N_CLASSES}, {CANDIDATE_IDS[0]} + i, 1
                  FROM range({N_CANDIDATES}) t(i)
        UNION ALL SELECT {CANDIDATE_GROUP_ID}, {CANDIDATE_IDS[0]} + i, 2
                  FROM range({N_CANDIDATES}) t(i)
        UNION ALL SELECT {CANDIDATE_GROUP_ID}, {CLASS_IDS[0]} + i, 1 FROM range({N_CLASSES}) t(i)
        UNION ALL SELECT {NOISE_GROUP_ID}, {NOISE_DRUG_BASE} + i, 1
                  FROM range({N_NOISE_DRUGS}) t(i)
        UNION ALL SELECT {NOISE_GROUP_ID}, {COMPARATOR_ID}, 1
    """)
    _copy(con, folder, "concept_ancestor", {
        "ancestor_concept_id": "ancestor", "descendant_concept_id": "descendant",
        "min_levels_of_separation": "levels", "max_levels_of_separation": "levels",
    }, "bench_ancestor")
    _copy(con, folder, "cdm_source", {
        "cdm_source_name": "'Cohortflow national-scale benchmark CDM'",
        "cdm_source_abbreviation": "'cohortflow_bench'", "cdm_holder": "'cohortflow'",
        "source_description": f"'bench.scale_cdm v{GENERATOR_VERSION}: {int(persons)} persons, "
                              f"seed {int(seed)}'",
        "cdm_etl_reference": "'bench.scale_cdm.generate_scale_cdm'", "cdm_version": "'v5.3'",
        "source_release_date": "DATE '2023-01-01'", "cdm_release_date": "DATE '2023-01-01'",
    }, "(SELECT 1)")


def cached_cdm(root: Path, *, persons: int, seed: int = 0, threads: int | None = None,
               memory_limit: str | None = None) -> tuple[Path, dict, bool]:
    """The CDM for (persons, seed, version) under `root`, generated unless already there.

    Returns (folder, generator info, whether it was generated now). A folder counts as
    complete only with its generator.json (written last) from the same DuckDB version.
    """
    folder = Path(root) / f"scale_cdm_p{persons}_s{seed}_v{GENERATOR_VERSION}"
    marker = folder / "generator.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("duckdb_version") == duckdb.__version__:
            return folder, info, False
    partial = folder.with_name(folder.name + ".partial")
    info = generate_scale_cdm(partial, persons=persons, seed=seed, threads=threads,
                              memory_limit=memory_limit)
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder, info, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/bench"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    folder, info, generated = cached_cdm(args.out, persons=args.persons, seed=args.seed,
                                         threads=args.threads)
    print(f"{folder}: {'generated' if generated else 'cached'}; {json.dumps(info)}")


if __name__ == "__main__":
    main()
