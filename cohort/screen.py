"""Treatments as a screen: every drug ingredient with enough eligible new users is a candidate.

Exposure records roll up to their ingredients through concept_ancestor. An ingredient's
eligible new users are the persons whose first exposure to it passes every arm-level rule
(observation, study window, prior observation, age, sex, the history washout needs, criteria).
The screen table (every ingredient considered, with its counts and whether it was selected)
goes into the run record.
"""

from __future__ import annotations

import re

import pandas as pd

from cohort.design import CohortDesign, ConceptSetDef
from cohort.eligibility import eligible_entries
from cohort.exposures import EXPOSURE_COLUMNS, build_exposures
from cohort.source import RecordSource, SourceError


def screen_candidates(source: RecordSource, design: CohortDesign) -> pd.DataFrame:
    """Expand design.screen; add the candidates' concept sets to cf_concept_set.

    Returns one row per ingredient with at least one exposed person after exclusions:
    ingredient_concept_id, ingredient, set_name, exposed_persons, eligible_new_users (NULL when
    fewer persons were exposed at all than the minimum), selected.
    """
    screen = design.screen
    assert screen is not None
    _require_vocabulary(source)
    con = source.con
    table, concept_col, _, _ = EXPOSURE_COLUMNS[design.exposure_table]
    excluded_ids = [x for x in screen.exclude if isinstance(x, int)]
    excluded_sets = [x for x in screen.exclude if isinstance(x, str)]
    if design.comparator and design.comparator.kind == "active" and design.comparator.name:
        excluded_sets.append(design.comparator.name)
    exposed = con.execute(f"""
        WITH ingredient AS (
            SELECT concept_id, concept_name FROM concept
            WHERE concept_class_id = 'Ingredient' AND domain_id = 'Drug'
              AND coalesce(standard_concept, '') = 'S'
              AND concept_id NOT IN (SELECT unnest($excluded_ids::BIGINT[]))
              AND concept_id NOT IN (  -- an excluded class (e.g. an ATC group) takes its own
                  SELECT descendant_concept_id FROM concept_ancestor
                  WHERE ancestor_concept_id IN (SELECT unnest($excluded_ids::BIGINT[])))
              AND concept_id NOT IN (SELECT concept_id FROM cf_concept_set
                                     WHERE set_name IN (SELECT unnest($excluded_sets)))
        ), rolled AS (
            SELECT DISTINCT i.concept_id, e.person_id
            FROM {table} e
            JOIN concept_ancestor a ON a.descendant_concept_id = e.{concept_col}
            JOIN ingredient i ON i.concept_id = a.ancestor_concept_id
            WHERE e.person_id IS NOT NULL
        )
        SELECT i.concept_id AS ingredient_concept_id, i.concept_name AS ingredient,
               count(*) AS exposed_persons
        FROM rolled r JOIN ingredient i USING (concept_id)
        GROUP BY ALL ORDER BY ingredient, ingredient_concept_id
    """, {"excluded_ids": excluded_ids, "excluded_sets": excluded_sets}).df()
    exposed["set_name"] = _set_names(exposed, set(design.concept_sets))
    worth = exposed[exposed["exposed_persons"] >= screen.min_new_users]
    con.register("cf_screen_input", worth[["set_name", "ingredient_concept_id"]])
    con.execute("""
        INSERT INTO cf_concept_set
        SELECT s.set_name, a.descendant_concept_id FROM cf_screen_input s
        JOIN concept_ancestor a ON a.ancestor_concept_id = s.ingredient_concept_id
        UNION SELECT set_name, ingredient_concept_id FROM cf_screen_input
    """)
    con.unregister("cf_screen_input")
    names = list(worth["set_name"])
    build_exposures(source, design, names)
    eligible_entries(source, design, "cf_screen_eligible")
    counts = dict(con.execute("SELECT set_name, count(*) FROM cf_screen_eligible "
                              "GROUP BY set_name").fetchall())
    con.execute("DROP TABLE cf_screen_eligible")
    # ingredients with fewer exposed persons than the minimum are not counted further (NULL)
    counted = exposed["set_name"].isin(names)
    exposed["eligible_new_users"] = (exposed["set_name"].map(counts).fillna(0)
                                     .where(counted).astype("Int64"))
    exposed["selected"] = (exposed["eligible_new_users"] >= screen.min_new_users).fillna(False)
    exposed["selected"] = exposed["selected"].astype(bool)
    con.execute("DELETE FROM cf_concept_set WHERE set_name IN (SELECT unnest($names))",
                {"names": [n for n in names if n not in set(
                    exposed.loc[exposed["selected"], "set_name"])]})
    return exposed


def screen_concept_sets(screen: pd.DataFrame) -> dict[str, ConceptSetDef]:
    """The selected candidates as concept sets (ingredient and its descendants)."""
    chosen = screen[screen["selected"]]
    return {name: ConceptSetDef(name, (int(cid),))
            for name, cid in zip(chosen["set_name"], chosen["ingredient_concept_id"],
                                 strict=True)}


def _set_names(exposed: pd.DataFrame, taken: set[str]) -> list[str]:
    """Readable, unique set names from ingredient names (celecoxib; else ingredient_<id>)."""
    names, used = [], set(taken)
    for name, concept_id in zip(exposed["ingredient"], exposed["ingredient_concept_id"],
                                strict=True):
        slug = re.sub(r"[^a-z0-9]+", "_", str(name or "").lower()).strip("_")[:50]
        if not slug or not slug[0].isalpha():
            slug = f"ingredient_{concept_id}"
        if slug in used:
            slug = f"{slug}_{concept_id}"
        used.add(slug)
        names.append(slug)
    return names


def _require_vocabulary(source: RecordSource) -> None:
    problems = []
    if not source.has_rows("concept"):
        problems.append("no concept table")
    elif not {"concept_class_id", "standard_concept"} <= set(source.tables["concept"]):
        problems.append("the concept table lacks concept_class_id or standard_concept")
    if not source.has_rows("concept_ancestor"):
        problems.append("concept_ancestor is empty or missing")
    if problems:
        raise SourceError(f"{source.path}: treatments screen needs the vocabulary to find "
                          f"ingredients and roll products up to them: {'; '.join(problems)}")
