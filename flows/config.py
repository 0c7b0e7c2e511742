"""The study file: pydantic models of the YAML contract in ARCHITECTURE.md, and its loader.

Every documented key parses and validates. A key whose behaviour is not built yet is rejected
with "not supported yet" rather than silently ignored, so a study never runs a design other
than the one its file describes. Errors name the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cohort.design import (
    COVARIATE_DOMAINS,
    CohortDesign,
    ConceptSetDef,
    OutcomeDef,
)

IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
CONCEPT_SET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
SUPPORTED_ESTIMATORS = ("crude", "iptw", "ps_strata")
PLANNED_ESTIMATORS = ("ps_match", "aipw", "overlap", "standardization", "dml")


class StudyFileError(Exception):
    """A study file that cannot be used; the message is one line naming file, line and field."""


def not_supported(what: str) -> ValueError:
    return ValueError(f"{what} is not supported yet")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _no_bool(value: Any) -> Any:
    """YAML's true/false would otherwise pass as concept ids 1 and 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a concept id (a positive integer), got {value!r}")
    return value


# OMOP concept ids are 32-bit integers (CDM spec); covariate ids multiply them by 1000.
MAX_CONCEPT_ID = 2_147_483_647
ConceptId = Annotated[int, BeforeValidator(_no_bool), Field(gt=0, le=MAX_CONCEPT_ID)]


def _no_control_characters(value: str) -> str:
    """A path with a newline, tab or NUL cannot be a CDM and would break one-line messages."""
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError(f"contains a control character (newline, tab, NUL...): {value!r}")
    return value


class ConceptSet(_Strict):
    """OMOP concept ids; descendants (via concept_ancestor) are included unless switched off."""

    include: list[ConceptId] = Field(default_factory=list)
    exclude: list[ConceptId] = Field(default_factory=list)
    descendants: bool = True
    codes: list[Any] | None = None
    atlas: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ConceptSet:
        if self.codes is not None:
            raise not_supported("'codes' (source vocabulary codes)")
        if self.atlas is not None:
            raise not_supported("'atlas' (ATLAS concept-set JSON)")
        if not self.include:
            raise ValueError("'include' needs at least one concept id")
        return self


class Comparator(_Strict):
    active: str | None = None
    non_users: dict[str, Any] | None = None
    other_candidates: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> Comparator:
        if self.non_users is not None:
            raise not_supported("comparator 'non_users'")
        if self.other_candidates is not None:
            raise not_supported("comparator 'other_candidates'")
        if self.active is None:
            raise ValueError("expected {active: CONCEPT_SET_NAME}")
        return self


class Population(_Strict):
    prior_observation_days: int = Field(365, ge=0, le=36_500)
    washout_days: int = Field(365, ge=0, le=36_500)
    min_age: int | None = Field(None, ge=0, le=150)
    require: list[Any] = Field(default_factory=list)
    exclude: list[Any] = Field(default_factory=list)

    @field_validator("require", "exclude")
    @classmethod
    def _criteria(cls, value: list[Any]) -> list[Any]:
        if value:
            raise not_supported("inclusion/exclusion criteria")
        return value


class FollowUp(_Strict):
    start_day: int = Field(0, ge=0, le=36_500)  # follow-up never starts before time zero
    end_day: int | None = Field(None, ge=-36_500, le=36_500)
    strategy: Literal["intention_to_treat", "on_treatment"] = "intention_to_treat"
    exclude_prior_outcome: bool = True

    @model_validator(mode="after")
    def _check(self) -> FollowUp:
        if self.strategy == "on_treatment":
            raise not_supported("follow_up strategy 'on_treatment'")
        if self.end_day is not None and self.end_day < self.start_day:
            raise ValueError(
                f"end_day ({self.end_day}) is before start_day ({self.start_day})"
            )
        return self


class Covariates(_Strict):
    windows: list[tuple[int, int]] = Field(default_factory=lambda: [(-365, -1), (-30, -1)])
    domains: list[str] = Field(
        default_factory=lambda: ["condition", "drug", "procedure", "measurement", "demographics"]
    )
    min_prevalence: float = Field(0.001, ge=0.0, lt=1.0)

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not value:
            raise ValueError("at least one window is needed")
        if len(value) > 9:
            raise ValueError("at most 9 windows are supported")
        for start, end in value:
            if start > end:
                raise ValueError(f"window [{start}, {end}] starts after it ends")
            if end > 0:
                raise ValueError(
                    f"window [{start}, {end}] reaches after time zero; covariates must be "
                    "measured on or before day 0"
                )
            if start < -36_500:
                raise ValueError(f"window [{start}, {end}] reaches back more than 100 years")
        if len(set(value)) != len(value):
            raise ValueError("a window is listed twice")
        return value

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        for domain in value:
            if domain not in COVARIATE_DOMAINS:
                if domain in ("observation", "visit", "charlson"):
                    raise not_supported(f"covariate domain '{domain}'")
                raise ValueError(
                    f"unknown covariate domain {domain!r} (expected one of "
                    f"{', '.join(COVARIATE_DOMAINS)})"
                )
        if len(set(value)) != len(value):
            raise ValueError("a domain is listed twice")
        return value


class Diagnostics(_Strict):
    max_smd: float = Field(0.1, gt=0)
    min_equipoise: float = Field(0.2, ge=0, le=1)
    max_mdrr: float = Field(10.0, gt=1)
    max_ease: float = Field(0.25, gt=0)


class PositiveControls(_Strict):
    """Synthetic positive controls injected on every negative control (MethodEvaluation)."""

    effect_sizes: list[Annotated[float, Field(gt=1, le=20)]] = Field(
        default_factory=lambda: [1.5, 2.0, 4.0], min_length=1)


class Execution(_Strict):
    """Where the comparison tasks run (the command line overrides it); not part of the run id."""

    runner: Literal["threads", "processes", "dask"] = "threads"
    workers: int = Field(2, ge=1, le=1024)
    dask_address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Execution:
        if self.dask_address is not None and self.runner != "dask":
            raise ValueError("dask_address needs runner: dask")
        if self.dask_address is not None and not re.fullmatch(r"[a-z]+://\S+",
                                                               self.dask_address):
            raise ValueError(f"expected a scheduler address like tcp://host:8786, got "
                             f"{self.dask_address!r}")
        return self


class StudyConfig(_Strict):
    """A validated study file."""

    study: str
    description: str = ""
    source: Annotated[str, Field(min_length=1), AfterValidator(_no_control_characters)]
    concept_sets: dict[str, ConceptSet]
    exposure_table: Literal["drug_era", "drug_exposure"] = "drug_era"
    treatments: list[str] | dict[str, Any]
    comparator: Comparator
    time_zero: Literal["first_exposure"] = "first_exposure"
    population: Population = Field(default_factory=Population)
    outcomes: list[str]
    negative_controls: list[str | ConceptId] = Field(default_factory=list)
    positive_controls: PositiveControls | None = None
    follow_up: FollowUp = Field(default_factory=FollowUp)
    covariates: Covariates = Field(default_factory=Covariates)
    estimators: list[str] = Field(default_factory=lambda: list(SUPPORTED_ESTIMATORS))
    horizon_days: int | None = None
    diagnostics: Diagnostics = Field(default_factory=Diagnostics)
    min_cell_count: int = Field(5, ge=0, le=1000)
    schedule: str | None = None
    execution: Execution | None = None

    @field_validator("study")
    @classmethod
    def _study(cls, value: str) -> str:
        if not IDENTIFIER.fullmatch(value):  # match() would let a trailing newline through
            raise ValueError(
                "expected an identifier: a letter, then letters, digits, _ or - (at most 63)"
            )
        return value

    @field_validator("concept_sets")
    @classmethod
    def _names(cls, value: dict[str, ConceptSet]) -> dict[str, ConceptSet]:
        for name in value:
            if not CONCEPT_SET_NAME.fullmatch(name):
                raise ValueError(
                    f"concept-set name {name!r} is not an identifier (a letter, then letters, "
                    "digits or _)"
                )
        if not value:
            raise ValueError("at least one concept set is needed")
        return value

    @field_validator("treatments")
    @classmethod
    def _treatments(cls, value: list[str] | dict[str, Any]) -> list[str]:
        if isinstance(value, dict):
            if "screen" in value:
                raise not_supported("treatments 'screen'")
            raise ValueError("expected a list of concept-set names")
        if not value:
            raise ValueError("at least one treatment is needed")
        if len(set(value)) != len(value):
            raise ValueError("a treatment is listed twice")
        return value

    @field_validator("outcomes")
    @classmethod
    def _outcomes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one outcome is needed")
        if len(set(value)) != len(value):
            raise ValueError("an outcome is listed twice")
        return value

    @field_validator("negative_controls", mode="before")
    @classmethod
    def _control_items(cls, value: Any) -> Any:
        """Name the bad item (the str | int union would report only its str branch)."""
        for item in value if isinstance(value, list) else ():
            if isinstance(item, str):
                continue
            if isinstance(item, bool) or not isinstance(item, int) or not (
                    0 < item <= MAX_CONCEPT_ID):
                raise ValueError(
                    f"expected concept-set names or concept ids (positive integers), got "
                    f"{item!r}"
                )
        return value

    @field_validator("negative_controls")
    @classmethod
    def _controls(cls, value: list[str | int]) -> list[str | int]:
        if len(set(value)) != len(value):
            raise ValueError("a negative control is listed twice")
        return value

    @field_validator("estimators")
    @classmethod
    def _estimators(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one estimator is needed")
        for name in value:
            if name in PLANNED_ESTIMATORS:
                raise not_supported(f"estimator '{name}'")
            if name not in SUPPORTED_ESTIMATORS:
                raise ValueError(
                    f"unknown estimator {name!r} (expected one of "
                    f"{', '.join(SUPPORTED_ESTIMATORS)})"
                )
        return list(dict.fromkeys(value))

    @field_validator("horizon_days")
    @classmethod
    def _horizon(cls, value: int | None) -> int | None:
        if value is not None:
            raise not_supported("'horizon_days' (risk difference / risk ratio estimators)")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        """A cron string as the Prefect server accepts it (for `cohortflow serve`)."""
        if value is not None:
            from prefect.schedules import validate_cron_string  # only for scheduled studies

            validate_cron_string(value)
        return value

    @model_validator(mode="after")
    def _references(self) -> StudyConfig:
        known = self.concept_sets
        for field, names in (
            ("treatments", self.treatments),
            ("comparator.active", [self.comparator.active]),
            ("outcomes", self.outcomes),
            ("negative_controls", [n for n in self.negative_controls if isinstance(n, str)]),
        ):
            for name in names:
                if name not in known:
                    raise ValueError(
                        f"{field}: unknown concept set {name!r} (defined: "
                        f"{', '.join(sorted(known))})"
                    )
        if self.comparator.active in self.treatments:
            raise ValueError(
                f"comparator.active: {self.comparator.active!r} is also a treatment"
            )
        if self.positive_controls is not None and not self.negative_controls:
            raise ValueError(
                "positive_controls: synthetic positive controls are built from negative "
                "controls; list some under negative_controls"
            )
        clash = set(self.outcomes) & {n for n in self.negative_controls if isinstance(n, str)}
        if clash:
            raise ValueError(
                f"negative_controls: {sorted(clash)} also listed as outcomes of interest"
            )
        return self

    def sha256(self) -> str:
        """Hash of the validated content (not the file's formatting): the study's identity."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def design(self, base_dir: Path) -> CohortDesign:
        """The cohort layer's view of this study; relative paths resolve against base_dir."""
        sets = {
            name: ConceptSetDef(name, tuple(cs.include), tuple(cs.exclude), cs.descendants)
            for name, cs in self.concept_sets.items()
        }
        outcomes = [OutcomeDef(name, "outcome") for name in self.outcomes]
        for control in self.negative_controls:
            if isinstance(control, int):
                name = f"concept_{control}"
                sets.setdefault(name, ConceptSetDef(name, (control,), (), True))
            else:
                name = control
            outcomes.append(OutcomeDef(name, "negative_control"))
        return CohortDesign(
            concept_sets=sets,
            exposure_table=self.exposure_table,
            comparisons=tuple((t, self.comparator.active) for t in self.treatments),
            prior_observation_days=self.population.prior_observation_days,
            washout_days=self.population.washout_days,
            min_age=self.population.min_age,
            outcomes=tuple(dict.fromkeys(outcomes)),
            risk_start_day=self.follow_up.start_day,
            risk_end_day=self.follow_up.end_day,
            exclude_prior_outcome=self.follow_up.exclude_prior_outcome,
            covariate_windows=tuple(tuple(w) for w in self.covariates.windows),
            covariate_domains=tuple(self.covariates.domains),
            min_prevalence=self.covariates.min_prevalence,
        )


class LoadedStudy(BaseModel):
    """A validated study with where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    config: StudyConfig
    source_path: Path

    @property
    def sha256(self) -> str:
        return self.config.sha256()

    def design(self) -> CohortDesign:
        return self.config.design(self.path.parent)


def load_study(path: str | Path) -> LoadedStudy:
    """Read, parse and validate a study file; raise StudyFileError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise StudyFileError(f"{path}: no such study file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyFileError(f"{path}: cannot read the file ({exc})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StudyFileError(f"{path}{where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise StudyFileError(f"{path}: not valid YAML: nested too deeply") from None
    _check_duplicate_keys(path, root)
    if not isinstance(data, dict):
        raise StudyFileError(f"{path}: expected a mapping of study keys at the top level")
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise StudyFileError(_describe(path, root, exc)) from None
    try:
        source = Path(config.source).expanduser()
    except RuntimeError as exc:  # "~someone/..." for an unknown user
        line = _line_of(root, ["source"])
        raise StudyFileError(f"{path}:{line}: source: cannot expand the path ({exc})") from None
    if not source.is_absolute():
        source = (path.parent / source).resolve()
    return LoadedStudy(path=path, config=config, source_path=source)


def _check_duplicate_keys(path: Path, root: yaml.Node | None) -> None:
    """Refuse a key given twice in one mapping (PyYAML would silently keep the last one)."""
    seen: set[int] = set()  # aliases share nodes: visit each once (no "billion laughs")
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, where = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                name = f"{where}{key.value}" if isinstance(key, yaml.ScalarNode) else where
                line = key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode) and key.value in first:
                    raise StudyFileError(
                        f"{path}:{line}: {name}: duplicate key (first given on line "
                        f"{first[key.value]})"
                    )
                if isinstance(key, yaml.ScalarNode):
                    first[key.value] = line
                stack.append((value, f"{name}."))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}{i}.") for i, item in enumerate(node.value))


def _short_repr(value: Any) -> str:
    """repr bounded in length and depth (an input built from YAML aliases can be huge)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict = 2, 4, 4
    short.maxstring = short.maxother = 60
    return short.repr(value)


def _describe(path: Path, root: yaml.Node | None, exc: ValidationError) -> str:
    """One line for the first validation error: file:line: field: what was expected."""
    error = exc.errors()[0]
    loc = [p for p in error["loc"] if not (isinstance(p, str) and "[" in p)]
    kind, message = error["type"], error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    named = re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", message)
    if not loc and named:  # a cross-field check names its own field
        loc, message = named.group(1).split("."), named.group(2)
    field = ".".join(str(p) for p in loc) or "(top level)"
    missing_item = kind == "missing" and bool(loc) and isinstance(loc[-1], int)  # [-365]
    line = None if kind == "missing" and not missing_item else _line_of(root, loc)
    where = f"{path}:{line}" if line else str(path)
    if kind == "extra_forbidden":
        message = "unknown key"
        parent = _model_at(loc[:-1])
        if parent is not None:
            message += f" (expected one of: {', '.join(parent.model_fields)})"
    elif missing_item:
        message = "a value is missing (too few items)"
    elif kind == "missing":
        message = "required key is missing"
    elif kind != "value_error" and "input" in error:
        message = f"{message}, got {_short_repr(error['input'])}"
    message = message.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever it quotes
    return f"{where}: {field}: {message}"


def _model_at(loc: list[Any]) -> type[BaseModel] | None:
    model: type[BaseModel] = StudyConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """1-based line of the deepest YAML node along loc (best effort)."""
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
