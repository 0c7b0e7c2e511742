"""Study files: every key parses; bad files give one line naming file, line and field, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.config import StudyFileError, load_study
from tests.tiny_cdm import concepts, write_cdm

ROOT = Path(__file__).parents[1]
GOOD = """\
study: tiny
source: cdm
concept_sets:
  t: {include: [101]}
  c: {include: [102]}
  o: {include: [201]}
treatments: [t]
comparator: {active: c}
outcomes: [o]
"""


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_configs_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        study = load_study(path)
        assert study.config.study


def test_defaults_and_design(tmp_path):
    study = load_study(write(tmp_path, GOOD))
    assert study.source_path == (tmp_path / "cdm").resolve()  # relative to the study file
    design = study.design()
    assert design.comparisons == (("t", "c"),)
    assert design.prior_observation_days == 365 and design.washout_days == 365
    assert design.concept_sets["t"].descendants is True
    assert design.covariate_windows == ((-365, -1), (-30, -1))
    assert study.config.estimators == ["crude", "iptw", "ps_strata"]


def test_negative_controls_by_id_and_name(tmp_path):
    text = GOOD + "negative_controls: [555, o2]\n"
    text = text.replace("  o: {include: [201]}", "  o: {include: [201]}\n  o2: {include: [202]}")
    design = load_study(write(tmp_path, text)).design()
    roles = {o.name: o.role for o in design.outcomes}
    assert roles == {"o": "outcome", "concept_555": "negative_control",
                     "o2": "negative_control"}
    assert design.concept_sets["concept_555"].include == (555,)


def test_hash_ignores_formatting_but_not_content(tmp_path):
    a = load_study(write(tmp_path, GOOD, "a.yaml")).sha256
    b = load_study(write(tmp_path, "# comment\n" + GOOD.replace("[t]", "[ t ]"), "b.yaml")).sha256
    c = load_study(write(tmp_path, GOOD + "min_cell_count: 10\n", "c.yaml")).sha256
    assert a == b != c


BAD_FILES = [
    # (replacement applied to GOOD, or full text), expected message fragment
    ("study: tiny\nsource: [", r"study\.yaml:\d+: not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of study keys"),
    (GOOD + "colour: blue\n", r"study\.yaml:10: colour: unknown key \(expected one of: study,"),
    (GOOD + "population: {min_age: old}\n",
     r"study\.yaml:10: population\.min_age: Input should be a valid integer.*'old'"),
    (GOOD + "population: {prior_observation_days: -5}\n",
     r"population\.prior_observation_days: Input should be greater than or equal to 0"),
    (GOOD.replace("treatments: [t]", "treatments: [tt]"),
     r"study\.yaml:7: treatments: unknown concept set 'tt' \(defined: c, o, t\)"),
    (GOOD.replace("comparator: {active: c}", "comparator: {active: zz}"),
     r"comparator\.active: unknown concept set 'zz'"),
    (GOOD.replace("study: tiny", "study: 'x; DROP TABLE runs'"),
     r"study\.yaml:1: study: expected an identifier"),
    (GOOD.replace("  t: {include: [101]}", "  't; drop': {include: [101]}"),
     r"concept_sets: concept-set name 't; drop' is not an identifier"),
    (GOOD.replace("source: cdm\n", ""), r"study\.yaml: source: required key is missing"),
    (GOOD + "covariates: {windows: [[-10, -30]]}\n", r"window \[-10, -30\] starts after it ends"),
    (GOOD + "covariates: {windows: [[-10, 5]]}\n", r"reaches after time zero"),
    (GOOD + "follow_up: {start_day: 30, end_day: 10}\n",
     r"end_day \(10\) is before start_day \(30\)"),
    (GOOD + "follow_up: {strategy: on_treatment, end_anchor: time_zero}\n",
     r"follow_up: strategy on_treatment ends follow-up at the end of exposure"),
    (GOOD + "follow_up: {start_day: -3}\n", r"start_day \(-3\) is before time zero"),
    (GOOD + "estimators: [crude, aipw]\n", r"estimator 'aipw' is not supported yet"),
    (GOOD + "estimators: [magic]\n", r"unknown estimator 'magic'"),
    (GOOD.replace("comparator: {active: c}", "comparator: {non_users: {index: today}}"),
     r"comparator\.non_users\.index: Input should be 'matched_calendar' or 'random_visit'"),
    (GOOD.replace("comparator: {active: c}", "comparator: {active: c, other_candidates: true}"),
     r"comparator: expected exactly one of"),
    (GOOD.replace("comparator: {active: c}", "comparator: {other_candidates: true}"),
     r"comparator\.other_candidates: needs at least two treatments"),
    (GOOD.replace("comparator: {active: c}", "comparator: {non_users: {}}")
     + "follow_up: {strategy: on_treatment}\n", r"non-users have no exposure to end"),
    (GOOD.replace("treatments: [t]", "treatments: {screen: {min_new_users: 0}}"),
     r"treatments\.screen\.min_new_users: Input should be greater than or equal to 1"),
    (GOOD.replace("treatments: [t]", "treatments: {screen: {exclude: [zz]}}"),
     r"treatments\.screen\.exclude: unknown concept set 'zz'"),
    (GOOD.replace("treatments: [t]", "treatments: {screen: {min_new_user: 5}}"),
     r"treatments\.screen\.min_new_user: unknown key \(expected one of: level, min_new_users"),
    (GOOD.replace("treatments: [t]", "treatments: {screen: {}}").replace(
        "comparator: {active: c}", "comparator: {battery: {sme_class: 3}}"),
     r"comparator\.battery\.sme_class: unknown key \(expected one of: random, same_class"),
    (GOOD.replace("treatments: [t]", "treatments: {screen: {}}").replace(
        "comparator: {active: c}", "comparator: {battery: {random: true}}"),
     r"comparator\.battery\.random: Input should be a valid integer"),
    (GOOD.replace("treatments: [t]", "treatments: {screen: {}}").replace(
        "comparator: {active: c}", "comparator: {battery: {same_class: true}}"),
     r"comparator\.battery\.same_class: expected a number of trials or 'all'"),
    (GOOD.replace("comparator: {active: c}", "comparator: {battery: {random: 2}}"),
     r"comparator\.battery: draws comparator drugs from a screen"),
    (GOOD + "population: {disease: {concept_set: t, window: [-30, 10]}}\n",
     r"population\.disease\.window: window \[-30, 10\] starts before the diagnosis"),
    (GOOD.replace("treatments: [t]", "treatments: {list: [t]}"),
     r"treatments: expected a list of concept-set names or \{screen"),
    (GOOD + "schedule: '61 3 * * *'\n", r"study\.yaml:\d+: schedule: Invalid cron string"),
    (GOOD + "execution: {runner: gpu}\n", r"execution\.runner: Input should be 'threads'"),
    (GOOD + "execution: {dask_address: 'tcp://h:8786'}\n", r"dask_address needs runner: dask"),
    (GOOD + "horizon_days: 365\n", r"'horizon_days' .* is not supported yet"),
    (GOOD.replace("  o: {include: [201]}", "  o: {codes: [{vocabulary: ICD10CM, code: 'K*2'}]}"),
     r"concept_sets\.o\.codes\.0\.code: '\*' may only end a code"),
    (GOOD.replace("  o: {include: [201]}", "  o: {codes: [{code: K92.2}]}"),
     r"concept_sets\.o\.codes\.0\.vocabulary: required key is missing"),
    (GOOD.replace("  o: {include: [201]}", "  o: {include: []}"),
     r"concept_sets\.o: expected at least one concept id under 'include', a code"),
    (GOOD.replace("  o: {include: [201]}", "  o: {atlas: missing.json}"),
     r"concept_sets\.o\.atlas: "),
    (GOOD.replace("  o: {include: [201]}", "  o: {include: [-3]}"),
     r"concept_sets\.o\.include\.0: Input should be greater than 0"),
    (GOOD + "covariates: {domains: [condition, genome]}\n", r"unknown covariate domain 'genome'"),
    (GOOD + "exposure_table: drug_strength\n", r"exposure_table: Input should be 'drug_era'"),
    (GOOD.replace("comparator: {active: c}", "comparator: {active: t}"), r"is also a treatment"),
    (GOOD + "population: {require: [o]}\n",
     r"population\.require\.0: Input should be a valid dictionary"),
    (GOOD + "population: {require: [{concept_set: zz}]}\n",
     r"population\.require\.concept_set: unknown concept set 'zz'"),
    (GOOD + "population: {exclude: [{concept_set: o, window: [0, -30]}]}\n",
     r"window \[0, -30\] starts after it ends"),
    (GOOD + "population: {min_age: 60, max_age: 50}\n", r"max_age \(50\) is below min_age"),
    (GOOD + "population: {sex: [other]}\n", r"population\.sex\.0"),
    (GOOD + "population: {study_start: 2020-01-01, study_end: 2019-01-01}\n",
     r"study_end \(2019-01-01\) is before study_start"),
    (GOOD.replace("  o: {include: [201]}", "  o: {include: [201]}\n  non_users: {include: [9]}"),
     r"concept-set name 'non_users' is reserved"),
    (GOOD + "population: {both_arms: sometimes}\n",
     r"both_arms: Input should be 'remove', 'first', 'keep' or 'treated'"),
    (GOOD + "positive_controls: {effect_sizes: [2]}\n",
     r"positive_controls: synthetic positive controls are built from negative controls"),
    (GOOD + "negative_controls: [555]\npositive_controls: {effect_sizes: [0.5]}\n",
     r"positive_controls\.effect_sizes\.0: Input should be greater than 1"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_study_files(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(StudyFileError, match=message):
        load_study(path)
    assert main(["validate", "--no-source", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such study file" in capsys.readouterr().err


def test_missing_source_and_tables(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert main(["validate", str(path)]) == 2
    assert "cdm: no such file or folder (expected an OMOP CDM)" in capsys.readouterr().err
    write_cdm(tmp_path / "cdm")
    (tmp_path / "cdm" / "observation_period.parquet").unlink()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "table observation_period is missing" in err and err.count("\n") == 1


def test_missing_column_and_unknown_concept(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    write_cdm(tmp_path / "cdm", concept=concepts((101, "t", "Drug", "X", "1"),
                                         (201, "o", "Condition", "X", "2")))
    assert main(["validate", str(path)]) == 2
    assert "concept id(s) not in the source's concept table (c: 102)" in capsys.readouterr().err
    import pandas as pd
    era = pd.read_parquet(tmp_path / "cdm" / "drug_era.parquet").drop(
        columns=["drug_era_end_date"])
    era.to_parquet(tmp_path / "cdm" / "drug_era.parquet")
    assert main(["run", str(path), "--results", str(tmp_path / "r.duckdb")]) == 2
    assert "table drug_era lacks column(s) drug_era_end_date" in capsys.readouterr().err
    assert not (tmp_path / "r.duckdb").exists()


def test_source_of_the_wrong_kind(tmp_path, capsys):
    (tmp_path / "cdm").write_text("not a database")
    path = write(tmp_path, GOOD)
    assert main(["validate", str(path)]) == 2
    assert "expected a folder of <table>.parquet files or a .duckdb file" in (
        capsys.readouterr().err)


def test_every_documented_key_is_known():
    """The ARCHITECTURE example's keys are all accepted by the model (no silent drops)."""
    from flows.config import StudyConfig
    example = yaml.safe_load((ROOT / "configs" / "gibleed.yaml").read_text())
    assert set(example) <= set(StudyConfig.model_fields)
    documented = {"study", "description", "source", "concept_sets", "exposure_table",
                  "treatments", "comparator", "time_zero", "population", "outcomes",
                  "negative_controls", "follow_up", "covariates", "estimators", "horizon_days",
                  "diagnostics", "min_cell_count", "schedule", "positive_controls",
                  "execution", "propensity"}
    assert documented == set(StudyConfig.model_fields)


def _schema_keys(schema: dict, defs: dict, prefix: str = "") -> list[str]:
    """Every property path of a JSON Schema, nested objects included (a.b.c)."""
    keys = []
    for name, spec in schema.get("properties", {}).items():
        keys.append(prefix + name)
        refs = [spec.get("$ref")] + [alt.get("$ref") for alt in spec.get("anyOf", [])]
        for ref in filter(None, refs):
            keys += _schema_keys(defs[ref.split("/")[-1]], defs, f"{prefix}{name}.")
    return keys


def test_readme_study_file_reference_names_every_key():
    """Every key of the study file, nested ones included, is in the README's reference."""
    import re

    from flows.config import StudyConfig

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The study file"):readme.index("## The cohort engine")]
    schema = StudyConfig.model_json_schema()
    keys = _schema_keys(schema, schema.get("$defs", {}))
    assert len(keys) > 60
    missing = [k for k in keys if not re.search(rf"\b{k.split('.')[-1]}\b", section)]
    assert missing == []


def test_schema_command_prints_the_study_file_schema(capsys):
    import json

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "cohortflow study file"
    assert {"study", "source", "concept_sets", "treatments", "comparator", "outcomes"} <= set(
        schema["required"])
    assert schema["additionalProperties"] is False
    assert "positive_controls" in schema["properties"]


def test_duckdb_settings_reach_the_source(tmp_path):
    from flows.pipeline import open_study_source

    write_cdm(tmp_path / "cdm")
    study = load_study(write(tmp_path, GOOD + "execution: {memory_limit: 1GB, threads: 1, "
                                              "temp_directory: spill}\n"))
    source = open_study_source(study)
    try:
        settings = dict(source.con.execute(
            "SELECT name, value FROM duckdb_settings() WHERE name IN "
            "('memory_limit', 'threads', 'temp_directory')").fetchall())
    finally:
        source.close()
    assert settings["threads"] == "1"
    assert settings["memory_limit"] in ("1.0 GB", "953.6 MiB", "1000.0 MB")
    assert settings["temp_directory"] == str(tmp_path / "spill")
    with pytest.raises(StudyFileError, match=r"execution\.memory_limit: String should match"):
        load_study(write(tmp_path, GOOD + "execution: {memory_limit: lots}\n"))
