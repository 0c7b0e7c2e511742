"""Open an OMOP CDM (a .duckdb file or a folder of <table>.parquet) as DuckDB views.

Every CDM table the pipeline reads is exposed as a view named after the table in a fresh
in-memory DuckDB connection, so the SQL in `cohort/` is the same for both layouts and for CDM
v5.3 and v5.4 (the columns we read have the same names in both).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

# Columns each table must have for the parts of a study that read it.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "person": ("person_id", "gender_concept_id", "year_of_birth"),
    "observation_period": (
        "person_id", "observation_period_start_date", "observation_period_end_date",
    ),
    "drug_era": ("person_id", "drug_concept_id", "drug_era_start_date", "drug_era_end_date"),
    "drug_exposure": (
        "person_id", "drug_concept_id", "drug_exposure_start_date", "drug_exposure_end_date",
    ),
    "condition_occurrence": ("person_id", "condition_concept_id", "condition_start_date"),
    "procedure_occurrence": ("person_id", "procedure_concept_id", "procedure_date"),
    "measurement": ("person_id", "measurement_concept_id", "measurement_date"),
    "observation": ("person_id", "observation_concept_id", "observation_date"),
    "death": ("person_id", "death_date"),
    "visit_occurrence": ("person_id", "visit_concept_id", "visit_start_date"),
    "concept_relationship": ("concept_id_1", "concept_id_2", "relationship_id"),
    "concept": ("concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_code"),
    "concept_ancestor": ("ancestor_concept_id", "descendant_concept_id"),
}
OPTIONAL_TABLES = ("concept", "concept_ancestor", "concept_relationship", "cdm_source")
NUMBER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL")


def column_kind(column: str) -> str:
    """What a required column holds: 'date', 'number' (ids, year of birth) or 'text'."""
    if column.endswith("_date"):
        return "date"
    if column.endswith("_concept_id") or column in ("person_id", "concept_id", "year_of_birth"):
        return "number"
    return "text"


def _type_problem(column: str, kind: str) -> str | None:
    """Why a column of DuckDB type `kind` cannot serve as `column`, or None."""
    expected = column_kind(column)
    if expected == "date" and kind != "DATE":
        return f"column {column} is {kind} (expected DATE)"
    if expected == "number" and kind.split("(")[0] not in NUMBER_TYPES:
        return f"column {column} is {kind} (expected an integer)"
    return None


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: object = None) -> object:
    """First value of a query's single row (duckdb 2 needs results consumed completely)."""
    return con.execute(sql, params).fetchall()[0][0]


class SourceError(Exception):
    """The record source cannot serve the study; the message says exactly what is missing."""


@dataclass
class RecordSource:
    """An opened CDM: a DuckDB connection with one view per available CDM table."""

    path: Path
    con: duckdb.DuckDBPyConnection
    tables: dict[str, list[str]] = field(default_factory=dict)  # table -> column names
    types: dict[str, dict[str, str]] = field(default_factory=dict)  # table -> column -> type
    files: dict[str, Path] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # table -> why (blocks if needed)

    @property
    def cdm_version(self) -> str:
        if "cdm_source" in self.tables and "cdm_version" in self.tables["cdm_source"]:
            version = scalar(self.con, "SELECT max(cdm_version) FROM cdm_source")
            if version:
                return str(version)
        return "unknown"

    def has_rows(self, table: str) -> bool:
        if table not in self.tables:
            return False
        return bool(scalar(self.con, f'SELECT EXISTS (SELECT 1 FROM "{table}")'))

    def require(self, needs: dict[str, tuple[str, ...]]) -> None:
        """Raise SourceError listing every missing table and column among `needs`."""
        problems = []
        for table, columns in needs.items():
            if table in self.unreadable:
                problems.append(self.unreadable[table])
                continue
            if table not in self.tables:
                problems.append(f"table {table} is missing")
                continue
            missing = [c for c in columns if c not in self.tables[table]]
            if missing:
                problems.append(f"table {table} lacks column(s) {', '.join(missing)}")
            kinds = self.types.get(table, {})
            for column in columns:
                problem = _type_problem(column, kinds[column]) if column in kinds else None
                if problem:
                    problems.append(f"table {table} {problem}")
        if problems:
            raise SourceError(f"{self.path}: {'; '.join(problems)}")

    def fingerprint(self) -> dict:
        """Tables, row counts and file sizes/mtimes: changes whenever the data does."""
        tables = {}
        for table in sorted(self.tables):
            entry: dict = {
                "rows": scalar(self.con, f'SELECT count(*) FROM "{table}"'),
            }
            if table in self.files:
                stat = self.files[table].stat()
                entry.update(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
            tables[table] = entry
        if self.path.is_file():
            stat = self.path.stat()
            tables["_file"] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        digest = hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()
        return {"path": str(self.path), "cdm_version": self.cdm_version,
                "sha256": digest, "tables": tables}

    def close(self) -> None:
        self.con.close()


def open_source(
    path: str | Path, *, memory_limit: str | None = None, threads: int | None = None,
    temp_directory: str | None = None,
) -> RecordSource:
    """Open a CDM folder of Parquet files or a .duckdb file, read-only."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder (expected an OMOP CDM)")
    if not (path.is_dir() or path.is_file()):  # a FIFO or a device would hang or never end
        raise SourceError(f"{path}: not a regular file or folder (expected an OMOP CDM)")
    con = duckdb.connect()
    for setting, value in (("memory_limit", memory_limit), ("threads", threads),
                           ("temp_directory", temp_directory)):
        if value is not None:
            con.execute(f"SET {setting} = ?", [value])
    source = RecordSource(path=path, con=con)
    if path.is_dir():
        _attach_parquet_folder(source)
    elif path.suffix in (".duckdb", ".db"):
        _attach_duckdb_file(source)
    else:
        con.close()
        raise SourceError(
            f"{path}: expected a folder of <table>.parquet files or a .duckdb file"
        )
    if "person" not in source.tables:
        con.close()
        raise SourceError(source.unreadable.get("person")
                          or f"{path}: no person table found; is this an OMOP CDM?")
    return source


def scan_tables(source: RecordSource, needs: dict[str, tuple[str, ...]]) -> None:
    """Read every needed column of every needed table once, so that a damaged data page is
    found before a run (naming its file) rather than in the middle of one."""
    for table, columns in needs.items():  # names come from REQUIRED_COLUMNS / `require`
        listed = ", ".join(f'bit_xor(hash("{c}"))'  # decodes every page (count() may not)
                           for c in columns if c in source.tables.get(table, []))
        if not listed:
            continue
        try:
            source.con.execute(f'SELECT {listed} FROM "{table}"').fetchall()
        except duckdb.Error as exc:
            where = source.files.get(table, source.path)
            raise SourceError(f"{where}: table {table} cannot be read (a damaged file?): "
                              f"{str(exc).splitlines()[0]}") from None


def _attach_parquet_folder(source: RecordSource) -> None:
    """One view per <table>.parquet; a file that cannot be opened blocks only a study that
    needs its table (see `require`); two files for one table are refused."""
    files: dict[str, Path] = {}
    for file in sorted(source.path.glob("*.parquet")):
        table = file.stem.lower()
        if not table.replace("_", "").isalnum():
            continue
        if table in files:
            raise SourceError(f"{source.path}: both {files[table].name} and {file.name} would be "
                              f"table {table}; remove one")
        files[table] = file
    for table, file in files.items():
        if not file.is_file():
            source.unreadable[table] = f"{file}: not a regular file"
            continue
        try:
            _create_view(source, table, source.con.read_parquet(str(file)))
        except duckdb.Error as exc:
            reason = str(exc).splitlines()[0]
            source.unreadable[table] = f"{file}: not a readable Parquet file ({reason})"
            continue
        source.files[table] = file


def _attach_duckdb_file(source: RecordSource) -> None:
    try:
        source.con.execute("ATTACH ? AS cdm (READ_ONLY)", [str(source.path)])
    except duckdb.Error as exc:
        raise SourceError(f"{source.path}: not a readable DuckDB database ({exc})") from None
    rows = source.con.execute(
        "SELECT DISTINCT table_schema, table_name FROM information_schema.tables "
        "WHERE table_catalog = 'cdm'"
    ).fetchall()
    schemas = {}
    for schema, table in rows:
        if not (schema.replace("_", "").isalnum() and table.replace("_", "").isalnum()):
            continue
        schemas.setdefault(table.lower(), []).append((schema, table))
    for table, places in sorted(schemas.items()):
        if not table.replace("_", "").isalnum():
            continue
        schema, name = sorted(places, key=lambda p: p[0] != "main")[0]
        _create_view(source, table, source.con.sql(f'SELECT * FROM cdm."{schema}"."{name}"'))


def _create_view(source: RecordSource, table: str, relation: duckdb.DuckDBPyRelation) -> None:
    """Expose `relation` as view `table`, with the column types the cohort SQL expects.

    Required date columns stored as timestamps, and required columns of Parquet's null type
    (all values NULL), are cast; other wrong types are reported by `require`.
    """
    kinds = {name.lower(): str(kind).strip('"') for name, kind in zip(
        relation.columns, relation.types, strict=True)}
    casts = []
    for column in REQUIRED_COLUMNS.get(table, ()):  # constant names only reach the SQL
        kind, expected = kinds.get(column), column_kind(column)
        if kind == "NULL" or (expected == "date" and str(kind).startswith("TIMESTAMP")):
            target = {"date": "DATE", "number": "BIGINT", "text": "VARCHAR"}[expected]
            casts.append(f'CAST("{column}" AS {target}) AS "{column}"')
    if casts:
        relation = relation.project(f"* REPLACE ({', '.join(casts)})")
    relation.create_view(table)
    described = source.con.execute(f'DESCRIBE "{table}"').fetchall()
    source.tables[table] = [row[0].lower() for row in described]
    source.types[table] = {row[0].lower(): row[1] for row in described}
