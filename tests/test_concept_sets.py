"""Concept-set resolution (ids, source codes, code families, ATLAS items) on hand-made vocabularies.

Every expected set of concept ids below is worked out by hand from this tiny vocabulary:

  Standard (SNOMED-like, "S")              hierarchy (concept_ancestor, plus a self row each)
    1000 Dementia                            1000 > 1001 > 1002, 1003;  1000 > 1004
    1001 Alzheimer's disease (26929004)      1100 > 1101
    1002 Early onset Alzheimer's             5000 > 5010
    1003 Late onset Alzheimer's
    1004 Vascular dementia
    1100 Gastrointestinal hemorrhage
    1101 Upper GI hemorrhage
    1200 Acute myocardial infarction
    5000 celecoxib (RxNorm ingredient), 5010 celecoxib 200 MG Oral Capsule (RxNorm product)
  Source (non-standard) codes and their 'Maps to' rows
    ICD10CM 2001 G30 -> 1001, 2002 G30.0 -> 1002, 2003 G30.9 -> 1001, 2004 G31.0 -> 1004,
            2010 K92.2 -> 1100, 2011 K92.21 -> 1101 (a test-only child code),
            2020 R69 (maps to nothing), 2030 K9_2 (odd code with an underscore) -> 1200
    Read    3001 G30.. (Read's G30 is myocardial infarction, not Alzheimer's) -> 1200
    NDC     5101 -> 5000, 5102 -> 5010
  SNOMED 1100 also has a 'Maps to' row to itself (real vocabularies have one per standard
  concept); the other standard concepts have none, so they map to themselves by rule.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from cohort.atlas import read_atlas_concept_set
from cohort.concepts import concept_set_labels, resolve_concept_sets
from cohort.design import ConceptItem, ConceptSetDef
from cohort.source import RecordSource, SourceError, open_source
from tests.shared_data import GIBLEED, SYNTHEA, needs
from tests.tiny_cdm import concepts, write_cdm

DEMENTIA, ALZ, ALZ_EARLY, ALZ_LATE, VASCULAR = 1000, 1001, 1002, 1003, 1004
GI_BLEED, UPPER_GI_BLEED, MI = 1100, 1101, 1200
CELECOXIB, CELECOXIB_200 = 5000, 5010
NDC_INGREDIENT, NDC_PRODUCT = 5101, 5102
ICD_G30, ICD_G300, ICD_G309, ICD_G310 = 2001, 2002, 2003, 2004
ICD_K922, ICD_K9221, ICD_R69, ICD_ODD, READ_G30 = 2010, 2011, 2020, 2030, 3001

CONCEPTS = concepts(
    (DEMENTIA, "Dementia", "Condition", "SNOMED", "52448006", "Clinical Finding"),
    (ALZ, "Alzheimer's disease", "Condition", "SNOMED", "26929004", "Clinical Finding"),
    (ALZ_EARLY, "Early onset Alzheimer's", "Condition", "SNOMED", "416780008",
     "Clinical Finding"),
    (ALZ_LATE, "Late onset Alzheimer's", "Condition", "SNOMED", "416975007",
     "Clinical Finding"),
    (VASCULAR, "Vascular dementia", "Condition", "SNOMED", "429998004", "Clinical Finding"),
    (GI_BLEED, "Gastrointestinal hemorrhage", "Condition", "SNOMED", "74474003",
     "Clinical Finding"),
    (UPPER_GI_BLEED, "Upper GI hemorrhage", "Condition", "SNOMED", "37372002",
     "Clinical Finding"),
    (MI, "Acute myocardial infarction", "Condition", "SNOMED", "57054005", "Clinical Finding"),
    (CELECOXIB, "celecoxib", "Drug", "RxNorm", "140587", "Ingredient"),
    (CELECOXIB_200, "celecoxib 200 MG Oral Capsule", "Drug", "RxNorm", "205323",
     "Clinical Drug"),
    (NDC_INGREDIENT, "celecoxib bulk", "Drug", "NDC", "00025152531", "11-digit NDC", None),
    (NDC_PRODUCT, "Celebrex 200 MG", "Drug", "NDC", "00025152551", "11-digit NDC", None),
    (ICD_G30, "Alzheimer's disease", "Condition", "ICD10CM", "G30", "3-char nonbill code",
     None),
    (ICD_G300, "Alzheimer's disease with early onset", "Condition", "ICD10CM", "G30.0",
     "4-char billing code", None),
    (ICD_G309, "Alzheimer's disease, unspecified", "Condition", "ICD10CM", "G30.9",
     "4-char billing code", None),
    (ICD_G310, "Frontotemporal dementia", "Condition", "ICD10CM", "G31.0",
     "4-char billing code", None),
    (ICD_K922, "Gastrointestinal hemorrhage, unspecified", "Condition", "ICD10CM", "K92.2",
     "4-char billing code", None),
    (ICD_K9221, "Upper gastrointestinal hemorrhage (test-only code)", "Condition", "ICD10CM",
     "K92.21", "5-char billing code", None),
    (ICD_R69, "Illness, unspecified", "Condition", "ICD10CM", "R69", "3-char billing code",
     None),
    (ICD_ODD, "A code with an underscore", "Condition", "ICD10CM", "K9_2", "Test", None),
    (READ_G30, "Acute myocardial infarction", "Condition", "Read", "G30..", "Read", None),
)
MAPS_TO = [(ICD_G30, ALZ), (ICD_G300, ALZ_EARLY), (ICD_G309, ALZ), (ICD_G310, VASCULAR),
           (ICD_K922, GI_BLEED), (ICD_K9221, UPPER_GI_BLEED), (ICD_ODD, MI), (READ_G30, MI),
           (NDC_INGREDIENT, CELECOXIB), (NDC_PRODUCT, CELECOXIB_200), (GI_BLEED, GI_BLEED)]
HIERARCHY = [(DEMENTIA, ALZ), (DEMENTIA, ALZ_EARLY), (DEMENTIA, ALZ_LATE), (DEMENTIA, VASCULAR),
             (ALZ, ALZ_EARLY), (ALZ, ALZ_LATE), (GI_BLEED, UPPER_GI_BLEED),
             (CELECOXIB, CELECOXIB_200)]
STANDARD = [row[0] for row in CONCEPTS if row[6] == "S"]


def vocabulary_cdm(folder: Path, **changes: list[tuple]) -> Path:
    tables = dict(
        person=[(1, 8507, 1960)],
        concept=CONCEPTS,
        concept_relationship=[(a, b, "Maps to") for a, b in MAPS_TO]
        + [(b, a, "Mapped from") for a, b in MAPS_TO] + [(ICD_G300, ICD_G30, "Is a")],
        concept_ancestor=[(c, c) for c in STANDARD] + HIERARCHY,
    )
    tables.update(changes)
    return write_cdm(folder, **tables)


@pytest.fixture
def source(tmp_path):
    opened = open_source(vocabulary_cdm(tmp_path / "cdm"))
    yield opened
    opened.close()


def resolved(source: RecordSource, *sets: ConceptSetDef) -> dict[str, set[int]]:
    resolve_concept_sets(source, {cs.name: cs for cs in sets})
    rows = source.con.execute("SELECT set_name, concept_id FROM cf_concept_set").fetchall()
    result: dict[str, set[int]] = {cs.name: set() for cs in sets}
    for name, concept_id in rows:
        result[name].add(concept_id)
    return result


def code(vocabulary: str, text: str, **flags) -> ConceptItem:
    return ConceptItem(vocabulary=vocabulary, code=text, **flags)


def one(source: RecordSource, *items: ConceptItem, **kwargs) -> set[int]:
    return resolved(source, ConceptSetDef("s", items=items, **kwargs))["s"]


# --- concept ids -----------------------------------------------------------------------------

def test_ids_with_and_without_descendants(source):
    sets = resolved(source, ConceptSetDef("plain", (ALZ,), descendants=False),
                    ConceptSetDef("family", (ALZ,)))
    assert sets == {"plain": {ALZ}, "family": {ALZ, ALZ_EARLY, ALZ_LATE}}
    types = source.con.execute("DESCRIBE cf_concept_set").fetchall()
    assert [(row[0], row[1]) for row in types] == [("set_name", "VARCHAR"),
                                                   ("concept_id", "BIGINT")]


def test_exclude_with_and_without_descendants(source):
    with_children = ConceptSetDef("a", (DEMENTIA,), exclude=(ALZ,))
    just_it = ConceptSetDef("b", items=(ConceptItem(DEMENTIA),
                                        ConceptItem(ALZ, excluded=True, descendants=False)))
    assert resolved(source, with_children, just_it) == {
        "a": {DEMENTIA, VASCULAR}, "b": {DEMENTIA, ALZ_EARLY, ALZ_LATE, VASCULAR}}


# --- source codes ----------------------------------------------------------------------------

def test_exact_code_maps_to_standard_then_descendants(source):
    assert one(source, code("ICD10CM", "K92.2", descendants=False)) == {GI_BLEED}
    assert one(source, code("ICD10CM", "K92.2")) == {GI_BLEED, UPPER_GI_BLEED}


def test_exact_code_is_not_a_prefix(source):
    # K92.2 must not pick up K92.21 (-> 1101); only K92.2* does
    assert one(source, code("ICD10CM", "K92.2", descendants=False)) == {GI_BLEED}
    assert one(source, code("ICD10CM", "K92.2*", descendants=False)) == {GI_BLEED,
                                                                         UPPER_GI_BLEED}


def test_code_family(source):
    # G30* = G30, G30.0, G30.9 -> 1001, 1002 (not G31.0, not Read's G30..)
    assert one(source, code("ICD10CM", "G30*", descendants=False)) == {ALZ, ALZ_EARLY}
    assert one(source, code("ICD10CM", "G30*")) == {ALZ, ALZ_EARLY, ALZ_LATE}
    # G3* reaches G31.0 (-> 1004) but never another vocabulary's G3... codes (Read G30.. -> MI)
    assert one(source, code("ICD10CM", "G3*", descendants=False)) == {ALZ, ALZ_EARLY, VASCULAR}
    assert one(source, code("Read", "G3*", descendants=False)) == {MI}


def test_like_wildcards_are_plain_characters(source):
    # with LIKE 'K9_%', '_' would match any one character: K92.2 and K92.21 too
    assert one(source, code("ICD10CM", "K9_*", descendants=False)) == {MI}
    assert one(source, code("ICD10CM", "K9_2", descendants=False)) == {MI}
    with pytest.raises(SourceError, match=r"s: ICD10CM code K%\* not found"):
        one(source, code("ICD10CM", "K%*"))


def test_vocabulary_name_is_case_insensitive_code_is_not(source):
    assert one(source, code("icd10cm", "G30.0", descendants=False)) == {ALZ_EARLY}
    with pytest.raises(SourceError, match=r"s: ICD10CM code g30.0 not found"):
        one(source, code("ICD10CM", "g30.0"))


def test_standard_code_maps_to_itself(source):
    # 26929004 has no 'Maps to' row and is standard: itself; 74474003 has a self row
    assert one(source, code("SNOMED", "26929004", descendants=False)) == {ALZ}
    assert one(source, code("SNOMED", "26929004")) == {ALZ, ALZ_EARLY, ALZ_LATE}
    assert one(source, code("SNOMED", "74474003", descendants=False)) == {GI_BLEED}


def test_codes_ids_and_exclusions_combine(source):
    items = (code("ICD10CM", "G3*"), ConceptItem(ALZ_LATE, excluded=True),
             code("ICD10CM", "G30.0", excluded=True), ConceptItem(MI, descendants=False))
    assert one(source, *items) == {ALZ, VASCULAR, MI}


def test_deprecated_maps_to_rows_are_ignored(tmp_path):
    folder = vocabulary_cdm(tmp_path / "cdm")
    relationship = pd.read_parquet(folder / "concept_relationship.parquet")
    relationship["invalid_reason"] = pd.Series([None] * len(relationship), dtype="string")
    stale = pd.DataFrame({"concept_id_1": [ICD_K922], "concept_id_2": [MI],
                          "relationship_id": ["Maps to"], "invalid_reason": ["D"]})
    pd.concat([relationship, stale.astype(relationship.dtypes.to_dict())]).to_parquet(
        folder / "concept_relationship.parquet", index=False)
    source = open_source(folder)
    try:
        assert one(source, code("ICD10CM", "K92.2", descendants=False)) == {GI_BLEED}
    finally:
        source.close()


# --- includeMapped ---------------------------------------------------------------------------

def test_include_mapped_adds_source_concepts(source):
    plain = ConceptItem(CELECOXIB, descendants=False, mapped=True)
    family = ConceptItem(CELECOXIB, descendants=True, mapped=True)
    assert one(source, plain) == {CELECOXIB, NDC_INGREDIENT}
    assert one(source, family) == {CELECOXIB, CELECOXIB_200, NDC_INGREDIENT, NDC_PRODUCT}
    # a code item's mapped concepts: everything that maps to its standard concept(s)
    assert one(source, code("ICD10CM", "G30.9", descendants=False, mapped=True)) == {
        ALZ, ICD_G30, ICD_G309}


def test_excluded_mapped_item_removes_its_source_concepts(source):
    items = (ConceptItem(CELECOXIB, mapped=True),
             ConceptItem(CELECOXIB_200, excluded=True, descendants=False, mapped=True))
    assert one(source, *items) == {CELECOXIB, NDC_INGREDIENT}


# --- ATLAS files -----------------------------------------------------------------------------

def atlas_concept(concept_id: int, name: str, vocabulary: str, code_text: str,
                  domain: str = "Condition", klass: str = "Clinical Finding") -> dict:
    """A concept as ATLAS writes it in a concept-set expression."""
    return {"CONCEPT_CLASS_ID": klass, "CONCEPT_CODE": code_text, "CONCEPT_ID": concept_id,
            "CONCEPT_NAME": name, "DOMAIN_ID": domain, "INVALID_REASON": "V",
            "INVALID_REASON_CAPTION": "Valid", "STANDARD_CONCEPT": "S",
            "STANDARD_CONCEPT_CAPTION": "Standard", "VOCABULARY_ID": vocabulary}


ATLAS_DEMENTIA = {"items": [
    {"concept": atlas_concept(DEMENTIA, "Dementia", "SNOMED", "52448006"),
     "isExcluded": False, "includeDescendants": True, "includeMapped": False},
    {"concept": atlas_concept(VASCULAR, "Vascular dementia", "SNOMED", "429998004"),
     "isExcluded": True, "includeDescendants": True, "includeMapped": False},
    {"concept": atlas_concept(ALZ, "Alzheimer's disease", "SNOMED", "26929004"),
     "isExcluded": False, "includeDescendants": False, "includeMapped": True},
]}


def write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document, indent=2))
    return path


def test_read_atlas_expression_and_resolve(tmp_path, source):
    items = read_atlas_concept_set(write_json(tmp_path / "dementia.json", ATLAS_DEMENTIA))
    assert items == (ConceptItem(DEMENTIA, excluded=False, descendants=True, mapped=False),
                     ConceptItem(VASCULAR, excluded=True, descendants=True, mapped=False),
                     ConceptItem(ALZ, excluded=False, descendants=False, mapped=True))
    sets = resolved(source, ConceptSetDef("dementia", items=items, origin="dementia.json"))
    # Dementia family minus Vascular dementia, plus the ICD10CM codes that map to Alzheimer's
    assert sets["dementia"] == {DEMENTIA, ALZ, ALZ_EARLY, ALZ_LATE, ICD_G30, ICD_G309}


def test_read_atlas_whole_concept_set_export_and_default_flags(tmp_path):
    document = {"id": 7, "name": "GI bleed", "expression": {"items": [
        {"concept": atlas_concept(GI_BLEED, "Gastrointestinal hemorrhage", "SNOMED",
                                  "74474003")}]}}
    items = read_atlas_concept_set(write_json(tmp_path / "gi.json", document))
    assert items == (ConceptItem(GI_BLEED, excluded=False, descendants=False, mapped=False),)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"bad\.json: not JSON \(line 1, column 2: "),
    ("[]", r"bad\.json: top level is a list \(expected an ATLAS concept-set expression"),
    ('{"name": "x"}', r"bad\.json: no 'items' found"),
    ('{"ConceptSets": [], "PrimaryCriteria": {}}', r"bad\.json: this is an ATLAS cohort "),
    ('{"items": []}', r"bad\.json: items is empty \(expected at least one concept item\)"),
    ('{"expression": {"items": {}}}', r"bad\.json: expression\.items is an object \(expected "
                                      r"a list of concept items\)"),
    ('{"items": [{"concept": {"CONCEPT_ID": 1}}, {"concept": {"CONCEPT_NAME": "x"}}]}',
     r"bad\.json: items\[1\]\.concept has no CONCEPT_ID \(expected an integer OMOP concept"),
    ('{"items": [{"concept": {"CONCEPT_ID": "201826"}}]}',
     r'items\[0\]\.concept\.CONCEPT_ID is "201826" \(expected an integer OMOP concept id\)'),
    ('{"items": [{"concept": {"CONCEPT_ID": 2.5}}]}', r"CONCEPT_ID is 2\.5 \(expected an int"),
    ('{"items": [{"concept": {"CONCEPT_ID": true}}]}', r"CONCEPT_ID is true \(expected an int"),
    ('{"items": [{"concept": {"CONCEPT_ID": 0}}]}', r"CONCEPT_ID is 0 \(expected a concept id "
                                                    r"from 1 to 2147483647\)"),
    ('{"items": [{"CONCEPT_ID": 1}]}', r'items\[0\]\.concept is missing \(expected an object '),
    ('{"items": [7]}', r'items\[0\] is a number \(expected an object with "concept"\)'),
    ('{"items": [{"concept": {"CONCEPT_ID": 1}, "includeMapped": "yes"}]}',
     r'items\[0\]\.includeMapped is "yes" \(expected true or false\)'),
])
def test_bad_atlas_files_say_what_and_where(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        read_atlas_concept_set(path)
    assert "\n" not in str(caught.value)


def test_unreadable_atlas_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.json: cannot read the ATLAS concept-set "
                                         r"file \(No such file or directory\)"):
        read_atlas_concept_set(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"not a regular file \(expected an ATLAS concept-set"):
        read_atlas_concept_set(tmp_path)
    (tmp_path / "latin1.json").write_bytes(b'{"items": "\xe9"}')
    with pytest.raises(ValueError, match=r"latin1\.json: cannot read"):
        read_atlas_concept_set(tmp_path / "latin1.json")


# --- errors ----------------------------------------------------------------------------------

def test_unknown_ids_and_codes_are_named_in_one_line(source):
    dementia = ConceptSetDef("dementia", (DEMENTIA, 999), items=(
        code("ICD10CM", "G99.9"), code("ICD10CM", "R69"), code("ICD9CM", "331*")))
    other = ConceptSetDef("other", (GI_BLEED,), exclude=(888,))
    with pytest.raises(SourceError) as caught:
        resolved(source, dementia, other)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{source.path}: concept id(s) not in the source's concept table "
                              "(dementia: 999, other: 888); ")
    assert "dementia: ICD10CM code G99.9 not found in the source's concept table;" in message
    assert ("dementia: ICD10CM code R69 matches only concepts that map to no standard concept"
            in message)
    assert ("dementia: ICD9CM code 331* not found in the source's concept table (it has no "
            "ICD9CM concepts at all)") in message


def test_unknown_id_keeps_the_existing_message(source):
    with pytest.raises(SourceError, match=r"concept id\(s\) not in the source's concept table "
                                          r"\(c: 102\)$"):
        resolved(source, ConceptSetDef("c", (102,)))


def test_messages_name_the_atlas_file(source):
    with pytest.raises(SourceError, match=r"dementia \(atlas/dementia\.json\): ICD10CM code "
                                          r"G99 not found"):
        resolved(source, ConceptSetDef("dementia", items=(code("ICD10CM", "G99"),),
                                       origin="atlas/dementia.json"))
    with pytest.raises(SourceError, match=r"not in the source's concept table \(dementia "
                                          r"\(atlas/dementia\.json\): 999\)"):
        resolved(source, ConceptSetDef("dementia", items=(ConceptItem(999),),
                                       origin="atlas/dementia.json"))


def test_code_values_stay_data(source):
    evil = "x'); DROP TABLE concept; --"
    with pytest.raises(SourceError, match=r"ICD10CM code x'\); DROP TABLE concept; -- not fou"):
        one(source, code("ICD10CM", evil), code(evil, "G30"))
    assert source.con.execute("SELECT count(*) FROM concept").fetchall() == [(len(CONCEPTS),)]
    with pytest.raises(SourceError, match=r"s: ICD10CM code 'G30\\n' not found"):
        one(source, code("ICD10CM", "G30\n"))


def test_malformed_item_is_a_value_error(source):
    for item in (ConceptItem(), ConceptItem(vocabulary="ICD10CM"),
                 ConceptItem(ALZ, vocabulary="ICD10CM", code="G30"),
                 code("ICD10CM", "*")):
        with pytest.raises(ValueError, match=r"concept set s: an item needs either a concept id "
                                             r"or a vocabulary and a \(non-empty\) code"):
            one(source, item)


def test_source_without_vocabulary_tables(tmp_path):
    source = open_source(write_cdm(tmp_path / "cdm", person=[(1, 8507, 1960)]))
    try:
        warnings = resolve_concept_sets(source, {"t": ConceptSetDef("t", (ALZ,))})
        assert warnings == [
            "the source has no concept table: concept ids cannot be checked",
            "the source's concept_ancestor table is empty or missing: descendants cannot be "
            "resolved, so concept sets t use only their listed ids (and the standard concepts "
            "their codes map to)"]
        assert source.con.execute("SELECT * FROM cf_concept_set").fetchall() == [("t", ALZ)]
        sets = {"t": ConceptSetDef("t", (ALZ,)),
                "dementia": ConceptSetDef("dementia", items=(code("ICD10CM", "G30*"),))}
        with pytest.raises(SourceError, match=r"cdm: the source has no concept table \(or it is "
                                              r"empty\), so source codes cannot be resolved "
                                              r"\(concept sets: dementia\)$"):
            resolve_concept_sets(source, sets)
    finally:
        source.close()


def test_source_without_concept_relationship(tmp_path):
    source = open_source(vocabulary_cdm(tmp_path / "cdm", concept_relationship=[]))
    try:
        # standard codes still resolve (to themselves); source codes cannot be mapped
        assert one(source, code("SNOMED", "26929004", descendants=False)) == {ALZ}
        with pytest.raises(SourceError, match=r"dementia: ICD10CM code G30\* matches only "
                                              r"non-standard concepts, and the source has no "
                                              r"concept_relationship table"):
            resolved(source, ConceptSetDef("dementia", items=(code("ICD10CM", "G30*"),)))
        warnings = resolve_concept_sets(
            source, {"c": ConceptSetDef("c", items=(ConceptItem(CELECOXIB, mapped=True),))})
        assert warnings == [
            "the source's concept_relationship table is empty or missing: source concepts that "
            "map to concept sets c cannot be added (includeMapped)"]
    finally:
        source.close()


def test_hundreds_of_sets_resolve_set_based(tmp_path):
    """300 sets of each kind in one call: each set gets exactly its own concepts."""
    source = open_source(vocabulary_cdm(tmp_path / "cdm"))
    try:
        sets = {}
        for i in range(300):
            sets[f"id{i}"] = ConceptSetDef(f"id{i}", (ALZ,), exclude=(ALZ_LATE,))
            sets[f"code{i}"] = ConceptSetDef(f"code{i}", items=(code("ICD10CM", "K92.2*"),))
            sets[f"mapped{i}"] = ConceptSetDef(
                f"mapped{i}", items=(ConceptItem(CELECOXIB, descendants=False, mapped=True),))
        clock = time.perf_counter()
        resolve_concept_sets(source, sets)
        elapsed = time.perf_counter() - clock
        rows = source.con.execute(
            "SELECT set_name, list(concept_id ORDER BY concept_id) FROM cf_concept_set "
            "GROUP BY set_name").fetchall()
    finally:
        source.close()
    got = dict(rows)
    assert len(got) == 900
    assert all(got[f"id{i}"] == [ALZ, ALZ_EARLY] for i in range(300))
    assert all(got[f"code{i}"] == [GI_BLEED, UPPER_GI_BLEED] for i in range(300))
    assert all(got[f"mapped{i}"] == [CELECOXIB, NDC_INGREDIENT] for i in range(300))
    assert elapsed < 10  # one query per kind; a loop per set would take far longer


# --- real data -------------------------------------------------------------------------------

@pytest.mark.shared_data
@needs(GIBLEED)
def test_gibleed_icd10cm_code_maps_to_snomed():
    source = open_source(GIBLEED)
    try:
        # ICD10CM K92.2 (concept 35208414) 'Maps to' SNOMED 192671 gastrointestinal hemorrhage
        sets = resolved(
            source,
            ConceptSetDef("bleed", items=(code("ICD10CM", "K92.2"),)),
            ConceptSetDef("family", items=(code("ICD10CM", "K92*", descendants=False),)),
            ConceptSetDef("mapped", items=(ConceptItem(192671, mapped=True),)),
            ConceptSetDef("ndc", items=(code("NDC", "00025152531", descendants=False),)))
        assert sets["bleed"] == {192671}     # concept_ancestor has only its self row
        assert sets["family"] == {192671}    # K92 itself maps to nothing, K92.2 does
        assert sets["mapped"] == {192671, 35208414}
        assert sets["ndc"] == {1118088}      # celecoxib 200 MG Oral Capsule [Celebrex]
        with pytest.raises(SourceError, match=r"k92: ICD10CM code K92 matches only concepts "
                                              r"that map to no standard concept"):
            resolved(source, ConceptSetDef("k92", items=(code("ICD10CM", "K92"),)))
    finally:
        source.close()


@pytest.mark.shared_data
@needs(SYNTHEA)
def test_synthea_without_concept_ancestor():
    source = open_source(SYNTHEA)
    try:
        sets = {"sinusitis": ConceptSetDef("sinusitis", items=(code("SNOMED", "444814009"),)),
                "pharyngitis": ConceptSetDef("pharyngitis", (4112343,))}
        warnings = resolve_concept_sets(source, sets)
        assert warnings == [
            "the source's concept_ancestor table is empty or missing: descendants cannot be "
            "resolved, so concept sets pharyngitis, sinusitis use only their listed ids (and "
            "the standard concepts their codes map to)"]
        rows = source.con.execute("SELECT * FROM cf_concept_set ORDER BY 1").fetchall()
        assert rows == [("pharyngitis", 4112343), ("sinusitis", 40481087)]
        with pytest.raises(SourceError, match=r"dementia: ICD10CM code G30\* not found in the "
                                              r"source's concept table \(it has no ICD10CM "
                                              r"concepts at all\)$"):
            resolve_concept_sets(
                source, {"dementia": ConceptSetDef("dementia", items=(code("ICD10CM", "G30*"),))})
    finally:
        source.close()


def test_labels_cover_atlas_and_code_only_sets(source):
    sets = {"atlas": ConceptSetDef("atlas", items=(ConceptItem(ALZ),
                                                   ConceptItem(VASCULAR, excluded=True))),
            "codes": ConceptSetDef("codes", items=(code("ICD10CM", "K92.2"),)),
            "ids": ConceptSetDef("ids", (CELECOXIB,))}
    labels = concept_set_labels(source, sets).set_index("set_name")
    assert sorted(labels.index) == ["atlas", "codes", "ids"]
    assert list(labels.loc["atlas", "codes"]) == ["SNOMED:26929004"]
    assert list(labels.loc["ids", "names"]) == ["celecoxib"]
    assert list(labels.loc["codes", "codes"]) == []
