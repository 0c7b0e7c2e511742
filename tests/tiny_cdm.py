"""Build tiny OMOP CDMs (a handful of persons) as Parquet folders for hand-checked tests."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd

COLUMNS = {
    "person": {"person_id": "int64", "gender_concept_id": "int64", "year_of_birth": "int64"},
    "observation_period": {"person_id": "int64", "observation_period_start_date": "date",
                           "observation_period_end_date": "date"},
    "drug_era": {"person_id": "int64", "drug_concept_id": "int64",
                 "drug_era_start_date": "date", "drug_era_end_date": "date"},
    "drug_exposure": {"person_id": "int64", "drug_concept_id": "int64",
                      "drug_exposure_start_date": "date", "drug_exposure_end_date": "date"},
    "condition_occurrence": {"person_id": "int64", "condition_concept_id": "int64",
                             "condition_start_date": "date"},
    "procedure_occurrence": {"person_id": "int64", "procedure_concept_id": "int64",
                             "procedure_date": "date"},
    "measurement": {"person_id": "int64", "measurement_concept_id": "int64",
                    "measurement_date": "date"},
    "observation": {"person_id": "int64", "observation_concept_id": "int64",
                    "observation_date": "date"},
    "death": {"person_id": "int64", "death_date": "date"},
    "visit_occurrence": {"person_id": "int64", "visit_concept_id": "int64",
                         "visit_start_date": "date", "visit_end_date": "date"},
    "concept": {"concept_id": "int64", "concept_name": "str", "domain_id": "str",
                "vocabulary_id": "str", "concept_code": "str", "concept_class_id": "str",
                "standard_concept": "str"},
    "concept_ancestor": {"ancestor_concept_id": "int64", "descendant_concept_id": "int64"},
    "concept_relationship": {"concept_id_1": "int64", "concept_id_2": "int64",
                             "relationship_id": "str"},
}


def d(text: str) -> date:
    return date.fromisoformat(text)


def write_cdm(folder: Path, **tables: list[tuple]) -> Path:
    """Write each table (rows as tuples in COLUMNS order); unlisted tables are written empty."""
    folder.mkdir(parents=True, exist_ok=True)
    for table, columns in COLUMNS.items():
        rows = tables.get(table, [])
        frame = pd.DataFrame(rows, columns=list(columns))
        for column, kind in columns.items():
            if kind == "date":
                frame[column] = pd.to_datetime(frame[column]).dt.date
                frame[column] = frame[column].astype("object")
            elif kind == "int64":
                frame[column] = frame[column].astype("Int64")
            else:
                frame[column] = frame[column].astype("string")
        table_arrow = frame
        table_arrow.to_parquet(folder / f"{table}.parquet", index=False)
    return folder


def concepts(*rows: tuple) -> list[tuple]:
    """concept rows from (id, name, domain[, vocabulary, code, class, standard]).

    Omitted fields default to vocabulary "Test", code str(id), class "Test", standard "S".
    """
    defaults = ("Test", None, "Test", "S")
    full = []
    for row in rows:
        cid, name, domain, *rest = row
        vocabulary, code, klass, standard = (*rest, *defaults[len(rest):])
        full.append((cid, name, domain, vocabulary, str(cid) if code is None else code, klass,
                     standard))
    return full
