"""Read an OHDSI ATLAS concept-set expression (JSON) into ConceptItems.

ATLAS (and WebAPI, Capr, CirceR) describe a concept set as an expression: a list of items, each
a concept with three flags. Reading that file lets a study reuse a concept set curated in ATLAS
instead of retyping its ids; `cohort.concepts.resolve_concept_sets` then resolves the items the
way ATLAS's Circe does (descendants via concept_ancestor, includeMapped via 'Maps to', excluded
items removed after expansion).

Accepted shapes (both are what ATLAS exports):
  {"items": [...]}                                   the expression itself ("Export" tab)
  {"id": 3, "name": "...", "expression": {"items": [...]}}   a whole concept set (WebAPI)
Each item: {"concept": {"CONCEPT_ID": 201826, "CONCEPT_NAME": ..., ...},
            "isExcluded": false, "includeDescendants": true, "includeMapped": false}
The flags are optional (absent = false, as in Circe). Only CONCEPT_ID is used; the other concept
fields (name, vocabulary, code...) are ATLAS's copy for display and may be stale.
"""

from __future__ import annotations

import json
from pathlib import Path

from cohort.design import ConceptItem

MAX_CONCEPT_ID = 2_147_483_647  # OMOP concept ids are 32-bit integers (CDM specification)
FLAGS = {"isExcluded": "excluded", "includeDescendants": "descendants",
         "includeMapped": "mapped"}


def read_atlas_concept_set(path: Path) -> tuple[ConceptItem, ...]:
    """The items of the ATLAS concept-set expression in `path`, in file order.

    Raises ValueError with a one-line message starting with the path (file unreadable, not JSON,
    no items, an item without an integer CONCEPT_ID, a flag that is not true/false).
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO or a device would hang or never end
        raise ValueError(f"{path}: not a regular file (expected an ATLAS concept-set file)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # ATLAS downloads on Windows may carry a BOM
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{path}: cannot read the ATLAS concept-set file ({reason})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                         "expected an ATLAS concept-set expression") from None
    items, where = _items(path, document)
    return tuple(_item(path, f"{where}[{index}]", item) for index, item in enumerate(items))


def _items(path: Path, document: object) -> tuple[list, str]:
    """The items list and its JSON path, from either ATLAS export shape."""
    expected = ('expected an ATLAS concept-set expression: {"items": [...]} or '
                '{"expression": {"items": [...]}}')
    if not isinstance(document, dict):
        raise ValueError(f"{path}: top level is {_kind(document)} ({expected})")
    if "items" in document:
        items, where = document["items"], "items"
    elif isinstance(document.get("expression"), dict) and "items" in document["expression"]:
        items, where = document["expression"]["items"], "expression.items"
    elif "ConceptSets" in document:
        raise ValueError(f"{path}: this is an ATLAS cohort definition, not a concept set "
                         f"(export the concept set itself; {expected})")
    else:
        raise ValueError(f"{path}: no 'items' found ({expected})")
    if not isinstance(items, list):
        raise ValueError(f"{path}: {where} is {_kind(items)} (expected a list of concept items)")
    if not items:
        raise ValueError(f"{path}: {where} is empty (expected at least one concept item)")
    return items, where


def _item(path: Path, where: str, item: object) -> ConceptItem:
    if not isinstance(item, dict):
        raise ValueError(f'{path}: {where} is {_kind(item)} (expected an object with "concept")')
    concept = item.get("concept")
    if not isinstance(concept, dict):
        got = "missing" if concept is None else _kind(concept)
        raise ValueError(f'{path}: {where}.concept is {got} '
                         '(expected an object with "CONCEPT_ID")')
    if "CONCEPT_ID" not in concept:
        raise ValueError(f"{path}: {where}.concept has no CONCEPT_ID "
                         "(expected an integer OMOP concept id)")
    concept_id = concept["CONCEPT_ID"]
    if isinstance(concept_id, bool) or not isinstance(concept_id, int):
        raise ValueError(f"{path}: {where}.concept.CONCEPT_ID is {_show(concept_id)} "
                         "(expected an integer OMOP concept id)")
    if not 0 < concept_id <= MAX_CONCEPT_ID:
        raise ValueError(f"{path}: {where}.concept.CONCEPT_ID is {concept_id} "
                         f"(expected a concept id from 1 to {MAX_CONCEPT_ID})")
    flags = {}
    for key, field in FLAGS.items():
        value = item.get(key, False)
        if not isinstance(value, bool):
            raise ValueError(f"{path}: {where}.{key} is {_show(value)} (expected true or false)")
        flags[field] = value
    return ConceptItem(concept_id=concept_id, **flags)


def _kind(value: object) -> str:
    """A JSON type name for messages."""
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    """A JSON value in a message, shortened and on one line."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."
