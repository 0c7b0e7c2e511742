"""Resolve named concept sets to concept ids inside DuckDB (table `concept_set`).

Ids come from the study file as data (a registered table), never as SQL text. Descendants
are added through concept_ancestor; excluded ids (with their descendants when asked) are removed.
"""

from __future__ import annotations

import pandas as pd

from cohort.design import ConceptSetDef
from cohort.source import RecordSource, SourceError


def resolve_concept_sets(source: RecordSource, sets: dict[str, ConceptSetDef]) -> list[str]:
    """Create temp table concept_set(set_name, concept_id); return warnings for the run record."""
    warnings: list[str] = []
    rows = [
        (cs.name, concept_id, cs.descendants, excluded)
        for cs in sets.values()
        for ids, excluded in ((cs.include, False), (cs.exclude, True))
        for concept_id in ids
    ]
    definition = pd.DataFrame(rows, columns=["set_name", "concept_id", "descendants", "excluded"])
    definition = definition.astype({"concept_id": "int64"})
    con = source.con
    con.register("cf_concept_set_definition", definition)
    if source.has_rows("concept"):
        unknown = con.execute(
            "SELECT d.set_name, d.concept_id FROM cf_concept_set_definition d "
            "ANTI JOIN concept c ON c.concept_id = d.concept_id ORDER BY 1, 2"
        ).fetchall()
        if unknown:
            listed = ", ".join(f"{name}: {cid}" for name, cid in unknown)
            raise SourceError(
                f"{source.path}: concept id(s) not in the source's concept table ({listed})"
            )
    else:
        warnings.append("the source has no concept table: concept ids cannot be checked")
    wants_descendants = bool(definition["descendants"].any())
    has_ancestry = source.has_rows("concept_ancestor")
    if wants_descendants and not has_ancestry:
        names = sorted(definition.loc[definition["descendants"], "set_name"].unique())
        warnings.append(
            "the source's concept_ancestor table is empty or missing: descendants cannot be "
            f"resolved, so concept sets {', '.join(names)} use only their listed ids"
        )
    expand = (
        "UNION SELECT d.set_name, a.descendant_concept_id, d.excluded "
        "FROM cf_concept_set_definition d JOIN concept_ancestor a "
        "ON a.ancestor_concept_id = d.concept_id WHERE d.descendants"
        if has_ancestry else ""
    )
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_concept_set AS
        WITH expanded AS (
            SELECT set_name, concept_id, excluded FROM cf_concept_set_definition
            {expand}
        )
        SELECT set_name, concept_id::BIGINT AS concept_id FROM expanded WHERE NOT excluded
        EXCEPT
        SELECT set_name, concept_id FROM expanded WHERE excluded
    """)
    con.unregister("cf_concept_set_definition")
    return warnings


def concept_names(source: RecordSource) -> str:
    """SQL for (concept_id, concept_name, domain_id), empty when the source has no concepts."""
    if "concept" in source.tables:
        return "SELECT concept_id, concept_name, domain_id FROM concept"
    return (
        "SELECT NULL::BIGINT AS concept_id, NULL::VARCHAR AS concept_name, "
        "NULL::VARCHAR AS domain_id WHERE false"
    )


def concept_set_labels(source: RecordSource, sets: dict[str, ConceptSetDef]) -> pd.DataFrame:
    """Per concept set, the stable identifiers of its listed concepts, for joining evidence.

    codes: "VOCABULARY:code" (e.g. RxNorm:140587); names: concept names; atc: ATC classes above
    the listed concepts where the vocabulary has them. Empty lists without vocabulary tables.
    """
    listed = pd.DataFrame(
        [(cs.name, concept_id) for cs in sets.values() for concept_id in cs.include],
        columns=["set_name", "concept_id"],
    ).astype({"concept_id": "int64"})
    labels = listed[["set_name"]].drop_duplicates().reset_index(drop=True)
    if not source.has_rows("concept"):
        return labels.assign(codes=[[]] * len(labels), names=[[]] * len(labels),
                             atc=[[]] * len(labels))
    con = source.con
    con.register("cf_listed", listed)
    atc = ("""
        SELECT l.set_name, list(DISTINCT a.concept_code || ' ' || a.concept_name
                                ORDER BY a.concept_code || ' ' || a.concept_name) AS atc
        FROM cf_listed l
        JOIN concept_ancestor ca ON ca.descendant_concept_id = l.concept_id
        JOIN concept a ON a.concept_id = ca.ancestor_concept_id
        WHERE a.vocabulary_id = 'ATC' GROUP BY l.set_name
    """ if source.has_rows("concept_ancestor") else
        "SELECT NULL::VARCHAR AS set_name, NULL::VARCHAR[] AS atc WHERE false")
    frame = con.execute(f"""
        WITH coded AS (
            SELECT l.set_name,
                   list(DISTINCT c.vocabulary_id || ':' || c.concept_code
                        ORDER BY c.vocabulary_id || ':' || c.concept_code) AS codes,
                   list(DISTINCT c.concept_name ORDER BY c.concept_name) AS names
            FROM cf_listed l JOIN concept c ON c.concept_id = l.concept_id
            GROUP BY l.set_name
        ), atc AS ({atc})
        SELECT s.set_name, coalesce(coded.codes, []) AS codes,
               coalesce(coded.names, []) AS names, coalesce(atc.atc, []) AS atc
        FROM (SELECT DISTINCT set_name FROM cf_listed) s
        LEFT JOIN coded USING (set_name) LEFT JOIN atc USING (set_name)
    """).df()
    con.unregister("cf_listed")
    return frame
