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
