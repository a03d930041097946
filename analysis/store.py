"""The run store: the only code that writes or reads recorded runs.

A store is a folder with one subfolder per run:

    <store>/store.json                     store schema version
    <store>/<run_id>/manifest.json         written first (status "running"), rewritten last
    <store>/<run_id>/heartbeat.json        time of the writer's last sign of life
    <store>/<run_id>/segments/<table>/<first:09d>-<last:09d>-seg-<writer>-<seq>.parquet
    <store>/<run_id>/segments/<table>/<first:09d>-<last:09d>-compact-<token>.parquet
    <store>/<run_id>/segments/<table>.by_layer/layer-<L>/<name of a compacted file of table>
    <store>/<run_id>/segments/<table>.by_layer/layer-<L>/<first:09d>-<last:09d>-compact-<token>.parquet  (merged)
    <store>/<run_id>/tmp/                  temp files, renamed into segments/ when complete

A .duckdb file open for writing cannot be read by another process, so the writer only ever adds
whole Parquet files (temp name, fsync, rename) and readers query them from in-memory DuckDB. A
compacted file lists the files it replaces in its Parquet metadata; readers ignore those until
they are deleted, so a reader never sees a row twice or misses one during compaction.

Router loads and expert biases are kept twice: in step order (a page shows one step of every layer)
and, for each compacted file, split by layer and sorted by (expert, step) in `<table>.by_layer`
(a page shows one expert's or one layer's history), for files of at least half COMPACT_FILE_ROWS (smaller
ones are read whole); a layer's copies are merged into one file (that lists the files it holds as covered)
every MERGE_COPIES copies and at a run's end. Copies are derived, so they are not fsynced: a damaged one is
skipped for the file it copies. A query that names its layer reads the copy of each compacted file where it
exists and the file itself where not, so both give the same rows; a merged copy counts only while every file
it holds is visible. The load roll-up is rebuilt at the end of a run sorted by (layer, step) in small row
groups, and a per step summary over layers (load_summary) is kept beside it.

A run whose writer is gone can be resumed from a step (Store.resume_run): the manifest is rewritten
first, then every row of a later step is dropped by the same replace-then-delete as compaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.drift import drift_sums, extend_drift, extendable
from analysis.schema import (
    LOAD_ROLLUP_SQL,
    LOAD_SUMMARY_SQL,
    SCHEMA_VERSION,
    SERIES_TABLES,
    TABLES,
    SchemaVersionError,
    validate_batch,
)

RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
SEGMENT_NAME = re.compile(
    r"(?P<first>\d{9,})-(?P<last>\d{9,})-(?P<kind>seg|compact)-(?P<token>[0-9a-f]{8}(?:-\d{6,})?)\.parquet")
TEMP_NAME = re.compile(rf"(?:{SEGMENT_NAME.pattern}|manifest\.json|heartbeat\.json)\.tmp")
STORE_FILE, MANIFEST, HEARTBEAT, COMPACT_LOCK = "store.json", "manifest.json", "heartbeat.json", "compact.lock"
COVERS_KEY = b"vpmoe.covers"
RESERVED_MANIFEST_KEYS = frozenset({"run_id", "status", "created_at", "finished_at", "schema_version", "writer",
                                    "final", "resumes"})
CLOSING_STATUSES = ("complete", "failed")
ROW_GROUP_ROWS = 122_880
# The rebuilt load roll-up is sorted by (layer, step); row groups of this size let a one-layer query
# skip all but one or two of them by their layer statistics.
ROLLUP_ROW_GROUP_ROWS = 8192
SERIES_SUFFIX = ".by_layer"
# A compacted file holds at most this many rows, so a step query still picks one small file by its
# name on a 100M-row run (one file per table would make every step query read a large footer).
COMPACT_FILE_ROWS = 32 * ROW_GROUP_ROWS
# A layer's copies are merged into one file once there are this many (and at a run's end), so that a one-layer
# read opens a few files, not one per compacted file (28 per table at 100M locked-shape rows).
MERGE_COPIES = 8
RECOVERY_ATTEMPTS = 3

T = TypeVar("T")


class StoreError(ValueError):
    """A run id, run state or query the store refuses; the message names the run or folder."""


class StoreWarning(UserWarning):
    """A stored file could not be read and was skipped (it is kept on disk)."""


@dataclass(frozen=True)
class Segment:
    """One Parquet file of one table of one run, with the step range its name carries."""

    path: Path
    first: int
    last: int
    kind: str
    rows: int
    covers: frozenset[str]
    schema: pa.Schema

    @property
    def name(self) -> str:
        """The file name."""
        return self.path.name


@dataclass
class _FooterEntry:
    """What the footer of one file said, valid while its size and mtime do not change."""

    size: int
    mtime_ns: int
    segment: Segment | None
    pages_verified: bool = False


def _now_iso() -> str:
    """The current UTC time as ISO 8601."""
    return datetime.now(UTC).isoformat()


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomic(path: Path, tmp_dir: Path, write: Callable[[Any], None], *, durable: bool = True) -> None:
    """Write `path` through `write(file)` under tmp_dir, fsync, and rename it into place."""
    tmp = tmp_dir / f"{path.name}.tmp"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _write_json_atomic(path: Path, tmp_dir: Path, value: Mapping[str, Any], *, durable: bool = True) -> None:
    """Write a JSON file atomically (temp name, fsync, rename)."""
    blob = json.dumps(value, indent=2, sort_keys=False).encode()
    _write_file_atomic(path, tmp_dir, lambda handle: handle.write(blob), durable=durable)


def _process_start(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (Linux /proc), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def _process_alive(pid: int, start: int | None) -> bool:
    """True while process `pid` runs and is the same process that started at `start` (pids are reused)."""
    if Path("/proc/self/stat").exists():
        return start is not None and _process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_run_id(run_id: object) -> str:
    """`run_id` if it is a valid run id ([A-Za-z0-9._-], 1 to 128 characters, not only dots), else StoreError."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or set(run_id) == {"."}:
        raise StoreError(f"run id {run_id!r} is not valid: use 1 to 128 of A-Z a-z 0-9 . _ - (not only dots)")
    return run_id


def _is_data_error(error: Exception) -> bool:
    """True for errors that a missing or damaged file can cause (not syntax or binding errors); a
    DuckDB result streamed to Arrow reports them as a plain OSError."""
    data_errors = (duckdb.IOException, duckdb.InvalidInputException, duckdb.InternalException)
    return type(error) in (duckdb.Error, OSError) or isinstance(error, data_errors)


def _locked_connection(directory: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can read files under `directory` only and cannot change its settings."""
    connection = duckdb.connect(config={"python_enable_replacements": False})
    connection.execute("SET allowed_directories = $dirs", {"dirs": [f"{directory}{os.sep}"]})
    # Files are never rewritten under the same name, so footers can be kept between queries.
    connection.execute("SET parquet_metadata_cache = true")
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    return connection


def _parquet_list(segments: list[Segment]) -> str:
    """A SQL read_parquet(...) call over the segments' paths as quoted literals."""
    literals = ", ".join("'" + str(segment.path).replace("'", "''") + "'" for segment in segments)
    union = ", union_by_name = true" if len({segment.schema for segment in segments}) > 1 else ""
    return f"read_parquet([{literals}]{union})"


class Store:
    """A folder of recorded runs: create runs for writing, list them, query them read-only."""

    def __init__(self, root: str | Path, *, stale_after_s: float = 60.0) -> None:
        """Open (creating if needed) the store folder; a writer silent for `stale_after_s` is gone."""
        if not stale_after_s > 0:
            # Writers beat every stale_after_s / 4: zero would spin the beat thread.
            raise StoreError(f"stale_after_s must be a positive number of seconds, got {stale_after_s!r}")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.stale_after_s = stale_after_s
        self._footers: dict[Path, dict[str, _FooterEntry]] = {}  # segment folder -> file name -> footer
        self._manifests: dict[Path, tuple[int, int, dict[str, Any]]] = {}
        self._check_store_file()
        self._db = _locked_connection(self.root)
        self._db_lock = threading.Lock()

    def create_run(self, run_id: str, manifest: Mapping[str, Any], *, flush_every_steps: int = 25,
                   flush_every_s: float = 2.0, compact_every_flushes: int = 64) -> RunWriter:
        """Start a new run: write its manifest (status "running") and return its writer.

        `manifest` needs `config` (dict) and may hold `kernels`, `data` (dicts), `code_revision`,
        `config_hash` and any other JSON provenance; run_id, status, times and the writer are set here.
        """
        check_run_id(run_id)
        manifest = _checked_manifest(run_id, manifest)
        record = {
            "run_id": run_id, "status": "running", "created_at": _now_iso(), "schema_version": SCHEMA_VERSION,
            "config_hash": manifest.get("config_hash") or _config_hash(run_id, manifest["config"]),
            "kernels": {}, "data": {}, "code_revision": None, **manifest, "writer": _writer_identity(),
        }
        self._write_store_file()
        run_dir = self.root / run_id
        try:
            run_dir.mkdir()
        except FileExistsError:
            raise StoreError(f"run {run_id!r} already exists at {run_dir}; pick a new run id") from None
        (run_dir / "tmp").mkdir()
        (run_dir / "segments").mkdir()
        _write_json_atomic(run_dir / MANIFEST, run_dir / "tmp", record)
        return RunWriter(self, run_dir, record, flush_every_steps=flush_every_steps, flush_every_s=flush_every_s,
                         compact_every_flushes=compact_every_flushes)

    def resume_run(self, run_id: str, manifest: Mapping[str, Any], from_step: int, *, flush_every_steps: int = 25,
                   flush_every_s: float = 2.0, compact_every_flushes: int = 64) -> RunWriter:
        """Continue a run whose writer is gone (incomplete, failed or complete) after `from_step`: drop its rows
        of later steps (they will be recorded again) and return a writer that appends to it, status "running".

        `manifest` is what create_run takes and must have the run's config hash; the stored config, hash and
        created_at are kept, and the new fields that differ are listed in the manifest's `resumes` entry.
        """
        run_dir = self._run_dir(run_id)
        if isinstance(from_step, bool) or not isinstance(from_step, int) or from_step < 0:
            raise StoreError(f"run {run_id}: from_step must be a step number (an int >= 0), got {from_step!r}")
        manifest = _checked_manifest(run_id, manifest)
        with self._run_lock(run_dir):
            stored = self._resumable_manifest(run_dir, manifest)
            self._remove_temp_files(run_dir)
            resume = {"from_step": from_step, "at": _now_iso(), "previous_status": self._status(run_dir, stored),
                      "changed": {key: value for key, value in manifest.items() if stored.get(key) != value}}
            record = {**{key: value for key, value in stored.items() if key not in ("finished_at", "final")},
                      "status": "running", "writer": _writer_identity(),
                      "resumes": [*stored.get("resumes", []), resume]}
            # The manifest says "running" before any row goes: a resume killed half-way leaves a run shown
            # as incomplete (never as complete with rows missing), and resuming again finishes the job.
            _write_json_atomic(run_dir / MANIFEST, run_dir / "tmp", record)
            writer = RunWriter(self, run_dir, record, flush_every_steps=flush_every_steps,
                               flush_every_s=flush_every_s, compact_every_flushes=compact_every_flushes)
            try:
                self._drop_steps_after(run_dir, from_step)
            except BaseException as error:
                writer._close_after_error(error)
                raise
        return writer

    def has_run(self, run_id: str) -> bool:
        """True if the store holds a run named `run_id` (whatever its status)."""
        return self._existing_run_dir(run_id) is not None

    def append_rows(self, run_id: str, table: str, columns: Mapping[str, Any]) -> None:
        """Add rows to an existing run as one atomic segment (audits and other rows written after the fact)."""
        run_dir = self._run_dir(run_id)
        batch = validate_batch(table, columns, run_id)
        with self._run_lock(run_dir):
            self._write_segment(run_dir, table, [batch], _step_range(batch), "seg-" + os.urandom(4).hex())

    def compact(self, run_id: str) -> None:
        """Merge each table's segments of a run into sorted files of at most COMPACT_FILE_ROWS rows (one
        file for all but the largest tables), rebuild its roll-ups and write the per-layer copies."""
        run_dir = self._run_dir(run_id)
        with self._run_lock(run_dir):
            if self.status(run_id) != "running":
                self._remove_temp_files(run_dir)
            for table, spec in TABLES.items():
                if not spec.derived:
                    self._compact_table(run_dir, table, major=True)
            self._rebuild_rollups(run_dir)
            for table in SERIES_TABLES:
                self._refresh_series(run_dir, table, merge_all=True)
            self._update_bias_drift(run_dir, recording=False)

    def runs(self) -> pd.DataFrame:
        """One row per run: run_id, status, created_at, finished_at, steps, last_step, tokens,
        config_hash, code_revision, writer_host, schema_version (ordered by created_at)."""
        rows = []
        for run_dir, manifest in self._readable_runs():
            steps, _ = self._scan(run_dir, "steps")
            rows.append({
                "run_id": run_dir.name, "status": self._status(run_dir, manifest),
                "created_at": manifest.get("created_at"), "finished_at": manifest.get("finished_at"),
                "steps": sum(segment.rows for segment in steps),
                "last_step": max((segment.last for segment in steps), default=None),
                "tokens": (manifest.get("final") or {}).get("tokens"),
                "config_hash": manifest.get("config_hash"), "code_revision": manifest.get("code_revision"),
                "writer_host": manifest["writer"].get("hostname"), "schema_version": manifest["schema_version"],
            })
        columns = ["run_id", "status", "created_at", "finished_at", "steps", "last_step", "tokens", "config_hash",
                   "code_revision", "writer_host", "schema_version"]
        return pd.DataFrame(rows, columns=columns).sort_values("created_at", ignore_index=True)

    def manifest(self, run_id: str) -> dict[str, Any]:
        """The run's manifest as written (a copy)."""
        return json.loads(json.dumps(self._manifest(self._run_dir(run_id))))

    def status(self, run_id: str) -> str:
        """"running", "complete", "failed" or "incomplete" (the manifest says running but the writer is gone)."""
        run_dir = self._run_dir(run_id)
        return self._status(run_dir, self._manifest(run_dir))

    def last_step(self, run_id: str, table: str = "steps") -> int | None:
        """The highest step of `table` acknowledged for the run, from file names (no data read); None if none."""
        run_dir = self._existing_run_dir(run_id)
        if run_dir is None or table not in TABLES:
            return None
        return max((segment.last for segment in self._scan(run_dir, table)[0]), default=None)

    def sql(self, query: str, params: list[Any] | dict[str, Any] | None = None, *, run: str | None = None,
            steps: tuple[int, int] | None = None, layer: int | None = None) -> pd.DataFrame:
        """Run one read-only SELECT over the store's tables (views named after them) and return a DataFrame.

        `run`, `steps` (a closed step range) and `layer` only narrow which files the views read (with
        `layer`, router_load and expert_bias read their per-layer copies); the query must still
        filter rows itself. A run that does not exist gives empty tables.
        """
        self._check_read_only(query)
        mentioned = set(re.findall(r"[a-z_]+", query.lower())) & TABLES.keys()

        def list_views() -> dict[str, list[Segment]]:
            # steps is renamed last at a flush, so listing it first means every step it shows is
            # complete in the tables listed after it.
            order = sorted(mentioned, key=lambda table: (table != "steps", table))
            return {table: self._table_segments(table, run, steps, layer) for table in order}

        def execute(views: dict[str, list[Segment]]) -> pd.DataFrame:
            with self._cursor() as cursor:
                for table, segments in views.items():
                    if segments:
                        cursor.execute(f"create temp view {table} as select * from {_parquet_list(segments)}")
                    else:
                        cursor.register(table, TABLES[table].schema.empty_table())
                # Arrow to pandas is about twice as fast as .df() for roll-up sized results.
                return cursor.sql(query, params=params).to_arrow_table().to_pandas()

        return self._recovering(list_views, execute)

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection of its own to the store's in-memory database (temp views stay private to it)."""
        with self._db_lock:
            cursor = self._db.cursor()
        try:
            yield cursor
        finally:
            cursor.close()

    def _rollups(self, router_load: pa.Table) -> dict[str, pa.Table]:
        """The load_rollup and load_summary rows of a batch of router_load rows, in step order."""
        with self._cursor() as cursor:
            cursor.register("batch", router_load)
            rollup = cursor.sql(LOAD_ROLLUP_SQL.format(source="batch") + " order by step, layer").to_arrow_table()
            cursor.register("rollup", rollup)
            summary = cursor.sql(LOAD_SUMMARY_SQL.format(source="rollup")).to_arrow_table()
        return {"load_rollup": rollup.cast(TABLES["load_rollup"].schema),
                "load_summary": summary.cast(TABLES["load_summary"].schema)}

    def _check_store_file(self) -> None:
        """Refuse a store whose store.json carries a newer or unknown schema version."""
        path = self.root / STORE_FILE
        if not path.exists():
            return
        try:
            version = json.loads(path.read_text()).get("schema_version")
        except (OSError, ValueError, AttributeError) as error:
            raise StoreError(f"{path}: cannot read the store file: {error}") from error
        _check_version(self.root, version)

    def _write_store_file(self) -> None:
        """Write store.json once, when the first run is created."""
        path = self.root / STORE_FILE
        if not path.exists():
            _write_json_atomic(path, self.root, {"schema_version": SCHEMA_VERSION, "created_at": _now_iso()})

    def _run_dir(self, run_id: str) -> Path:
        """The folder of an existing run, else StoreError."""
        check_run_id(run_id)
        run_dir = self.root / run_id
        if not (run_dir / MANIFEST).is_file():
            raise StoreError(f"no run {run_id!r} in {self.root}")
        return run_dir

    def _existing_run_dir(self, run_id: object) -> Path | None:
        """The folder of `run_id` if it names an existing run, None for anything else (hostile text included)."""
        try:
            return self._run_dir(run_id)  # type: ignore[arg-type]
        except StoreError:
            return None

    def _readable_runs(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """(folder, manifest) of every run by name; an unreadable manifest is skipped with a warning,
        a newer schema version raises."""
        run_dirs = sorted(path.parent for path in self.root.glob(f"*/{MANIFEST}") if RUN_ID.fullmatch(path.parent.name))
        for run_dir in run_dirs:
            try:
                yield run_dir, self._manifest(run_dir)
            except SchemaVersionError:
                raise
            except StoreError as error:
                warnings.warn(f"skipping run: {error}", StoreWarning, stacklevel=3)

    def _manifest(self, run_dir: Path) -> dict[str, Any]:
        """The run's manifest (cached while the file is unchanged), schema version checked."""
        path = run_dir / MANIFEST
        stat = path.stat()
        cached = self._manifests.get(path)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise StoreError(f"{path}: cannot read the run manifest: {error}") from error
        _check_version(run_dir, manifest.get("schema_version"))
        self._manifests[path] = (stat.st_size, stat.st_mtime_ns, manifest)
        return manifest

    def _status(self, run_dir: Path, manifest: Mapping[str, Any]) -> str:
        """The manifest status, with "running" turned into "incomplete" when its writer is gone."""
        if manifest["status"] != "running":
            return manifest["status"]
        writer = manifest["writer"]
        if writer.get("hostname") == socket.gethostname():
            return "running" if _process_alive(writer["pid"], writer.get("process_start")) else "incomplete"
        return "running" if time.time() - self._heartbeat_time(run_dir, manifest) < self.stale_after_s else "incomplete"

    def _resumable_manifest(self, run_dir: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The stored manifest of a run that `manifest` may resume, else StoreError saying why not."""
        run_id = run_dir.name
        try:
            stored = self._manifest(run_dir)
        except SchemaVersionError as error:
            raise StoreError(f"run {run_id}: cannot resume it: {error}") from error
        if stored.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"run {run_id}: written with schema version {stored.get('schema_version')!r}, this "
                             f"code writes {SCHEMA_VERSION}; record the continuation under a new run id")
        if self._status(run_dir, stored) == "running":
            writer = stored["writer"]
            raise StoreError(f"run {run_id}: its writer (pid {writer.get('pid')} on {writer.get('hostname')}) is "
                             "still recording it; stop it, or wait until the run shows as incomplete")
        new_hash = manifest.get("config_hash") or _config_hash(run_id, manifest["config"])
        if new_hash != stored.get("config_hash"):
            raise StoreError(f"run {run_id}: config hash {new_hash} differs from the run's {stored.get('config_hash')}"
                             "; resuming would mix two models in one run, record it under a new run id")
        return stored

    def _drop_steps_after(self, run_dir: Path, step: int) -> None:
        """Remove every row of a step after `step` from every table, then copy the new files by layer and
        delete the copies of removed ones.

        steps goes first (a flush writes it last): a step it still lists keeps all its rows elsewhere.
        """
        for table in sorted(TABLES, key=lambda name: name != "steps"):
            visible, replaced = self._scan(run_dir, table)
            self._remove_segments(replaced)
            self._remove_segments([segment for segment in visible if segment.first > step])
            for segment in visible:
                if segment.first <= step < segment.last:
                    self._truncate_segment(run_dir, table, segment, step)
        for table in SERIES_TABLES:
            self._refresh_series(run_dir, table)

    def _truncate_segment(self, run_dir: Path, table: str, segment: Segment, step: int) -> None:
        """Replace one segment by a compacted file of its rows up to `step` that lists it as replaced."""
        try:
            data = pq.ParquetFile(segment.path, page_checksum_verification=True).read()
        except (OSError, ValueError, pa.ArrowException) as error:
            raise StoreError(f"{segment.path}: cannot read it to drop its steps after {step}: {error}; move the file "
                             "out of the store and resume again") from error
        kept = data.filter(pc.less_equal(data["step"], step))
        row_group_rows = ROLLUP_ROW_GROUP_ROWS if TABLES[table].derived else ROW_GROUP_ROWS
        self._write_segment(run_dir, table, [kept], _step_range(kept), "compact-" + os.urandom(4).hex(),
                            covers=[segment.name], row_group_rows=row_group_rows)
        self._remove_segments([segment])

    @staticmethod
    def _heartbeat_time(run_dir: Path, manifest: Mapping[str, Any]) -> float:
        """Unix time of the writer's last heartbeat (its start time if it never beat)."""
        try:
            return float(json.loads((run_dir / HEARTBEAT).read_text())["time"])
        except (OSError, ValueError, KeyError, TypeError):
            return datetime.fromisoformat(manifest["created_at"]).timestamp()

    def _footer(self, path: Path, size: int, mtime_ns: int) -> Segment | None:
        """The segment at `path` if its Parquet footer reads, else None after a warning naming the file."""
        entry = self._footer_entry(path)
        if entry is not None and (entry.size, entry.mtime_ns) == (size, mtime_ns):
            return entry.segment
        match = SEGMENT_NAME.fullmatch(path.name)
        try:
            metadata = pq.read_metadata(path)
            covers = json.loads((metadata.metadata or {}).get(COVERS_KEY, b"[]"))
            segment = Segment(path=path, first=int(match["first"]), last=int(match["last"]), kind=match["kind"],
                              rows=metadata.num_rows, covers=frozenset(covers),
                              schema=metadata.schema.to_arrow_schema().remove_metadata())
        except FileNotFoundError:
            raise
        except (OSError, ValueError, pa.ArrowException) as error:
            warnings.warn(f"skipping unreadable segment {path}: {error}", StoreWarning, stacklevel=4)
            segment = None
        self._footers.setdefault(path.parent, {})[path.name] = _FooterEntry(size, mtime_ns, segment)
        return segment

    def _footer_entry(self, path: Path) -> _FooterEntry | None:
        """The cached footer of `path`, if any."""
        return self._footers.get(path.parent, {}).get(path.name)

    def _scan(self, run_dir: Path, table: str) -> tuple[list[Segment], list[Segment]]:
        """(visible, replaced) readable segments of one table: replaced ones are listed by a compacted file."""
        return self._scan_dir(run_dir / "segments" / table)

    def _scan_dir(self, directory: Path) -> tuple[list[Segment], list[Segment]]:
        """(visible, replaced) readable segments in one folder of segments."""
        for _attempt in range(5):
            segments, vanished = [], False
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                return [], []
            for entry in entries:
                if not SEGMENT_NAME.fullmatch(entry.name):
                    continue
                try:
                    stat = entry.stat()
                    segment = self._footer(Path(entry.path), stat.st_size, stat.st_mtime_ns)
                except FileNotFoundError:
                    # A compaction removed it after renaming its replacement in: list again to see that.
                    vanished = True
                    break
                if segment is not None:
                    segments.append(segment)
            if not vanished:
                # Forget files that are gone, so a long-lived reader's cache does not grow with compactions.
                known = self._footers.get(directory, {})
                self._footers[directory] = {entry.name: known[entry.name] for entry in entries if entry.name in known}
                replaced_names = frozenset().union(*(segment.covers for segment in segments))
                visible = [segment for segment in segments if segment.name not in replaced_names]
                replaced = [segment for segment in segments if segment.name in replaced_names]
                return sorted(visible, key=_segment_order), replaced
        raise StoreError(f"{directory}: segments kept changing while being listed")

    def _table_segments(self, table: str, run: str | None, steps: tuple[int, int] | None,
                        layer: int | None = None) -> list[Segment]:
        """Visible segments of `table` for one run (or all runs), narrowed to files overlapping `steps`;
        with `layer`, each compacted file of a series table is swapped for its copy of that layer."""
        if run is None:
            run_dirs = [run_dir for run_dir, _ in self._readable_runs()]
        else:
            run_dir = self._existing_run_dir(run)
            run_dirs = [] if run_dir is None else [run_dir]
        segments = []
        for run_dir in run_dirs:
            self._manifest(run_dir)
            segments += self._scan(run_dir, table)[0]
        # A merged copy is valid while every file it holds is visible, in the step range or not.
        names: dict[Path, set[str]] = {}
        for segment in segments:
            names.setdefault(segment.path.parent, set()).add(segment.name)
        if steps is not None:
            first, last = steps
            segments = [segment for segment in segments if segment.first <= last and segment.last >= first]
        if layer is None or table not in SERIES_TABLES:
            return segments
        copies: dict[Path, dict[str, Segment]] = {}
        swapped, used = [], set()
        for segment in segments:
            layer_dir = _series_dir(segment.path.parent, layer)
            if layer_dir not in copies:
                copies[layer_dir] = _copies_by_source(self._scan_dir(layer_dir)[0], names[segment.path.parent])
            copy = copies[layer_dir].get(segment.name)
            if copy is None:
                swapped.append(segment)
            elif copy.path not in used:  # a merged copy stands for several files: read it once
                used.add(copy.path)
                swapped.append(copy)
        return swapped

    def _verify_pages(self, segments: list[Segment]) -> bool:
        """Read every page of each segment with checksums; mark and warn about bad ones. True if any was bad."""
        found_bad = False
        for segment in segments:
            entry = self._footer_entry(segment.path)
            if entry is None or entry.pages_verified or entry.segment is None:
                continue
            try:
                for _batch in pq.ParquetFile(segment.path, page_checksum_verification=True).iter_batches():
                    pass
            except FileNotFoundError:
                continue
            except (OSError, ValueError, pa.ArrowException) as error:
                warnings.warn(f"skipping damaged segment {segment.path}: {error}", StoreWarning, stacklevel=4)
                entry.segment, found_bad = None, True
            entry.pages_verified = True
        return found_bad

    def _recovering(self, list_files: Callable[[], Any], read: Callable[[Any], T]) -> T:
        """`read(list_files())`, retried when a file vanished (compaction) or turns out damaged (skipped)."""
        files = list_files()
        for attempt in range(RECOVERY_ATTEMPTS):
            try:
                return read(files)
            except (duckdb.Error, OSError) as error:
                if not _is_data_error(error) or attempt == RECOVERY_ATTEMPTS - 1:
                    raise
                flat = [segment for group in (files.values() if isinstance(files, dict) else [files])
                        for segment in group]
                found_bad = self._verify_pages(flat)
                relisted = list_files()
                if not found_bad and relisted == files:
                    raise
                files = relisted
        raise AssertionError("unreachable: the last attempt returns or raises")

    @staticmethod
    def _check_read_only(query: str) -> None:
        """Refuse anything but exactly one SELECT (or WITH ... SELECT) statement."""
        try:
            statements = duckdb.extract_statements(query)
        except duckdb.Error as error:
            raise StoreError(f"query does not parse: {error}") from error
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            kinds = [statement.type.name for statement in statements]
            raise StoreError(f"store.sql runs exactly one read-only SELECT statement, got {kinds or 'none'}")

    def _write_segment(self, run_dir: Path, table: str, parts: Iterable[pa.Table | pa.RecordBatch],
                       steps: tuple[int, int], token: str, covers: list[str] | None = None,
                       row_group_rows: int = ROW_GROUP_ROWS) -> Path:
        """Write rows of one table (steps[0]..steps[1]) as a new segment atomically, in full-size row groups."""
        path = run_dir / "segments" / table / f"{steps[0]:09d}-{steps[1]:09d}-{token}.parquet"
        schema = TABLES[table].schema
        if covers:
            schema = schema.with_metadata({COVERS_KEY: json.dumps(sorted(covers)).encode()})
        _write_parquet(path, run_dir / "tmp", parts, schema, row_group_rows)
        return path

    @contextlib.contextmanager
    def _run_lock(self, run_dir: Path, *, wait: bool = True) -> Iterator[bool]:
        """Hold the run's compaction lock (an advisory flock, released if the holder dies); yields if held."""
        with open(run_dir / COMPACT_LOCK, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _compact_table(self, run_dir: Path, table: str, *, major: bool) -> None:
        """Merge runs of consecutive segments into files of up to COMPACT_FILE_ROWS rows; a minor
        compaction (live run) merges only the newest files: fresh segments, and the compacted files before them
        that hold under half of COMPACT_FILE_ROWS (a small table's compactions would otherwise pile up: a live
        loss curve read one file per compaction)."""
        visible, replaced = self._scan(run_dir, table)
        # Files a compacted file already replaces can go first: readers ignore them anyway.
        self._remove_segments(replaced)
        inputs = visible if major else _newest_small(visible)
        for group in _groups_up_to(inputs, COMPACT_FILE_ROWS):
            if len(group) > 1:
                in_order = all(a.last < b.first for a, b in itertools.pairwise(group))
                order = "" if in_order else " order by " + ", ".join(TABLES[table].sort_key)
                self._merge_into_segment(run_dir, table, group,
                                         lambda files, order=order: f"select * from {_parquet_list(files)}{order}")

    def _rebuild_rollups(self, run_dir: Path) -> None:
        """Recompute the load roll-up from the whole (compacted) router_load, sorted by (layer, step), and
        the per-step summary from it, each replacing its segments."""
        for table, source, sql in (
            ("load_rollup", "router_load", LOAD_ROLLUP_SQL + " order by layer, step"),
            ("load_summary", "load_rollup", LOAD_SUMMARY_SQL),
        ):
            inputs, _ = self._scan(run_dir, source)
            visible, replaced = self._scan(run_dir, table)
            self._remove_segments(replaced)
            if not inputs:
                self._compact_table(run_dir, table, major=True)
                continue
            if all(segment.kind == "compact" for segment in inputs + visible) and len(visible) == 1:
                continue
            self._merge_into_segment(run_dir, table, inputs,
                                     lambda files, sql=sql: sql.format(source=_parquet_list(files)),
                                     replaces=visible, row_group_rows=ROLLUP_ROW_GROUP_ROWS)

    def _update_bias_drift(self, run_dir: Path, *, recording: bool) -> None:
        """Bring the bias_drift roll-up of every layer up to the last expert_bias step (after the per-layer copies,
        which it reads) at the manifest's shape.bias_update_rate, or else at the estimated rate. At a given rate the
        roll-up there is extended by the later rows (drift.extend_drift); while `recording`, nothing is done
        without a given rate (an estimated rate needs every row again)."""
        last = self.last_step(run_dir.name, "expert_bias")
        visible, replaced = self._scan(run_dir, "bias_drift")
        self._remove_segments(replaced)
        if [segment.last for segment in visible] == [last] or (last is None and not visible):
            return
        shape = self._manifest(run_dir).get("shape")
        rate = shape.get("bias_update_rate") if isinstance(shape, Mapping) else None
        rate = float(rate) if isinstance(rate, int | float) and not isinstance(rate, bool) and rate > 0 else None
        if recording and rate is None:
            return
        run_id, parts = run_dir.name, []
        before = self._drift_to_extend(run_dir, visible, rate)
        later = None if before is None or last is None else self._bias_rows_by_layer(
            run_id, (int(before["step"].iloc[0]) + 1, last))
        if later is not None:
            layers = {int(layer) for layer in before["layer"]} | set(later)
        else:
            layers = set(self.sql("select distinct layer from expert_bias where run_id = $run", {"run": run_id},
                                  run=run_id)["layer"].astype(int))
        for layer in sorted(layers):
            sums = None
            if later is not None and rate is not None:
                step, expert, bias = later.get(layer, (np.zeros(0, np.int64),) * 3)
                sums = extend_drift(before[before["layer"] == layer], step, expert, bias, rate)
            if sums is None:
                rows = self._layer_bias_rows(run_id, layer, None)
                sums = drift_sums(rows["step"].to_numpy(), rows["expert"].to_numpy(), rows["bias"].to_numpy(), rate)
            if not sums.empty:
                parts.append(sums.assign(run_id=run_id, step=last, layer=layer, rate_given=rate is not None))
        if parts:
            rollup = pa.Table.from_pandas(pd.concat(parts), schema=TABLES["bias_drift"].schema, preserve_index=False)
            self._write_segment(run_dir, "bias_drift", [rollup], (last, last), "compact-" + os.urandom(4).hex(),
                                covers=[segment.name for segment in visible], row_group_rows=ROLLUP_ROW_GROUP_ROWS)
        self._remove_segments(visible)

    def _drift_to_extend(self, run_dir: Path, visible: list[Segment], rate: float | None) -> pd.DataFrame | None:
        """The run's bias_drift rows if they can be extended at `rate` (given, the same, with last_move), else None."""
        if rate is None or len(visible) != 1:
            return None
        with self._cursor() as cursor:
            rolled = cursor.sql(f"select * from {_parquet_list(visible)}").to_arrow_table().to_pandas()
        return rolled if extendable(rolled, rate) else None

    def _bias_rows_by_layer(self, run_id: str, steps: tuple[int, int]) -> dict[int, tuple[np.ndarray, ...]]:
        """Layer -> (step, expert, bias) arrays of every expert_bias row of `steps` (closed), in one read: the rows
        after a roll-up are a few recent files, where a read per layer would cost more than the rows."""
        rows = self.sql("select layer, step, expert, bias from expert_bias where run_id = $run"
                        " and step between $first and $last order by layer",
                        {"run": run_id, "first": steps[0], "last": steps[1]}, run=run_id, steps=steps)
        layer = rows["layer"].to_numpy()
        bounds = np.flatnonzero(np.diff(layer)) + 1  # where the sorted layer column changes
        columns = [np.split(rows[name].to_numpy(), bounds) for name in ("step", "expert", "bias")]
        return {int(chunk[0]): parts for chunk, *parts in zip(np.split(layer, bounds), *columns, strict=True)
                if len(chunk)}

    def _layer_bias_rows(self, run_id: str, layer: int, steps: tuple[int, int] | None) -> pd.DataFrame:
        """One layer's (step, expert, bias) rows, of `steps` (closed) or all, read from its per-layer copies."""
        where = "" if steps is None else " and step between $first and $last"
        params = {} if steps is None else {"first": steps[0], "last": steps[1]}
        return self.sql(f"select step, expert, bias from expert_bias where run_id = $run and layer = $layer{where}",
                        {"run": run_id, "layer": layer, **params}, run=run_id, steps=steps, layer=layer)

    def _refresh_series(self, run_dir: Path, table: str, *, merge_all: bool = False) -> None:
        """Write the per-layer copies of `table`'s compacted files that lack them, delete copies that hold a file
        that is gone (readers that listed one retry), and merge a layer's single copies into one once there are
        MERGE_COPIES of them (with `merge_all`, at a run's end: two). Only files of at least half COMPACT_FILE_ROWS
        get copies: smaller ones are cheap to read whole, and a live run's are rewritten as it grows."""
        sources = [segment for segment in self._scan(run_dir, table)[0] if _full(segment)]
        wanted = {segment.name for segment in sources}
        present: dict[int, set[str]] = {}
        for layer, layer_dir in _series_layer_dirs(run_dir, table).items():
            visible, replaced = self._scan_dir(layer_dir)
            stale = [copy for copy in visible if not _held(copy) <= wanted]
            self._remove_segments(replaced + stale)
            present[layer] = set().union(*(_held(copy) for copy in visible if copy not in stale))
        for source in sources:
            self._write_series(run_dir, table, source, present)
        for layer_dir in _series_layer_dirs(run_dir, table).values():
            singles = [copy for copy in self._scan_dir(layer_dir)[0] if not copy.covers and copy.name in wanted]
            if len(singles) >= (2 if merge_all else MERGE_COPIES):
                self._merge_copies(run_dir, table, singles)

    def _read_inputs(self, query: str, failure: str) -> pa.Table | None:
        """The rows of `query` over store files, or None after a warning `failure: error` when one of the files
        is missing or damaged (what would have been derived from them is then left as it is)."""
        with self._cursor() as cursor:
            try:
                return cursor.sql(query).to_arrow_table()
            except (duckdb.Error, OSError) as error:
                if not _is_data_error(error):
                    raise
                warnings.warn(f"{failure}: {error}", StoreWarning, stacklevel=4)
                return None

    def _merge_copies(self, run_dir: Path, table: str, singles: list[Segment]) -> None:
        """Write one layer's single copies, in step order, as one file that lists them as replaced (the files
        they copy), then delete them; a damaged one leaves them as they are."""
        names = sorted(copy.name for copy in singles)
        first, last = min(copy.first for copy in singles), max(copy.last for copy in singles)
        path = singles[0].path.parent / f"{first:09d}-{last:09d}-compact-{os.urandom(4).hex()}.parquet"
        schema = TABLES[table].schema.with_metadata({COVERS_KEY: json.dumps(names).encode()})
        rows = self._read_inputs(f"select * from {_parquet_list(sorted(singles, key=_segment_order))}",
                                 f"per-layer copies in {path.parent} not merged")
        if rows is None:
            return
        _write_parquet(path, run_dir / "tmp", [rows], schema, ROW_GROUP_ROWS, durable=False)
        self._remove_segments(singles)

    def _write_series(self, run_dir: Path, table: str, source: Segment, present: Mapping[int, set[str]]) -> None:
        """Split one compacted file by layer into copies sorted by (expert, step); every layer between the
        file's lowest and highest gets a copy (empty where it has no rows), so a complete set is visible."""
        failure = f"no per-layer copy of {source.path}"
        bounds = self._read_inputs(f"select min(layer), max(layer) from {_parquet_list([source])}", failure)
        if bounds is None:
            return
        low, high = (bounds.column(index)[0].as_py() for index in range(2))
        if low is None or all(source.name in present.get(layer, ()) for layer in range(low, high + 1)):
            return
        data = self._read_inputs(f"select * from {_parquet_list([source])} order by layer, expert, step", failure)
        if data is None:
            return
        layers = data["layer"].to_numpy()
        schema = TABLES[table].schema
        for layer in range(low, high + 1):
            if source.name in present.get(layer, ()):
                continue
            begin, end = np.searchsorted(layers, [layer, layer + 1])
            path = _series_dir(source.path.parent, layer) / source.name
            # Copies are not fsynced (an fsync per layer per file was most of a compaction's time): one a
            # power cut damages fails its footer or page checksums and is skipped for the file it copies.
            _write_parquet(path, run_dir / "tmp", [data.slice(begin, end - begin)], schema, ROW_GROUP_ROWS,
                           durable=False)

    def _merge_into_segment(self, run_dir: Path, table: str, inputs: list[Segment],
                            query: Callable[[list[Segment]], str], replaces: list[Segment] | None = None,
                            row_group_rows: int = ROW_GROUP_ROWS) -> None:
        """Write query(inputs) as one compacted segment that lists what it replaces, then delete those.

        `replaces` defaults to the inputs; damaged inputs found while reading are skipped and kept.
        """
        token = "compact-" + os.urandom(4).hex()

        def merge(files: list[Segment]) -> tuple[Path, list[Segment]]:
            gone = files if replaces is None else replaces
            steps = min(segment.first for segment in files), max(segment.last for segment in files)
            with self._cursor() as cursor:
                batches = cursor.sql(query(files)).to_arrow_reader(ROW_GROUP_ROWS)
                path = self._write_segment(run_dir, table, batches, steps, token,
                                           covers=[segment.name for segment in gone], row_group_rows=row_group_rows)
            return path, gone

        def readable_inputs() -> list[Segment]:
            entries = [self._footer_entry(segment.path) for segment in inputs]
            return [segment for segment, entry in zip(inputs, entries, strict=True)
                    if entry is not None and entry.segment is not None]

        _, gone = self._recovering(readable_inputs, merge)
        self._remove_segments(gone)

    @staticmethod
    def _remove_segments(segments: list[Segment]) -> None:
        """Delete segment files the store wrote and a compacted file now replaces."""
        for segment in segments:
            if SEGMENT_NAME.fullmatch(segment.name):
                segment.path.unlink(missing_ok=True)
        if segments:
            _fsync_dir(segments[0].path.parent)

    @staticmethod
    def _remove_temp_files(run_dir: Path) -> None:
        """Delete temp files left by a writer or compaction that died (only names the store uses)."""
        for path in (run_dir / "tmp").iterdir():
            if TEMP_NAME.fullmatch(path.name):
                path.unlink(missing_ok=True)


def _full(segment: Segment) -> bool:
    """A compacted file of at least half COMPACT_FILE_ROWS: never rewritten by a minor compaction, and copied
    by layer (smaller files are read whole)."""
    return segment.kind == "compact" and segment.rows >= COMPACT_FILE_ROWS // 2


def _newest_small(segments: list[Segment]) -> list[Segment]:
    """The newest segments (in step order) back to the first compacted file of at least half COMPACT_FILE_ROWS."""
    newest: list[Segment] = []
    for segment in reversed(segments):
        if _full(segment):
            break
        newest.append(segment)
    return newest[::-1]


def _groups_up_to(segments: list[Segment], rows: int) -> list[list[Segment]]:
    """Consecutive segments (in step order) grouped so that no group holds more than `rows` rows,
    except a single segment that is larger on its own."""
    groups: list[list[Segment]] = []
    group_rows = 0
    for segment in segments:
        if not groups or group_rows + segment.rows > rows:
            groups.append([])
            group_rows = 0
        groups[-1].append(segment)
        group_rows += segment.rows
    return groups


def _series_layer_dirs(run_dir: Path, table: str) -> dict[int, Path]:
    """Layer -> the folder of its per-layer copies of `table`, for every layer that has one."""
    base = run_dir / "segments" / f"{table}{SERIES_SUFFIX}"
    dirs = {}
    for layer_dir in base.iterdir() if base.is_dir() else ():
        match = re.fullmatch(r"layer-(\d+)", layer_dir.name)
        if match and layer_dir.is_dir():
            dirs[int(match[1])] = layer_dir
    return dirs


def _held(copy: Segment) -> frozenset[str]:
    """The names of the files a per-layer copy holds: its own (a single copy), or those a merged copy lists."""
    return copy.covers or frozenset([copy.name])


def _copies_by_source(copies: list[Segment], sources: set[str]) -> dict[str, Segment]:
    """File name -> the copy that holds it, for the copies whose every file is among `sources` (a merged copy
    holding a file that is gone would give its rows twice)."""
    return {name: copy for copy in copies if _held(copy) <= sources for name in _held(copy)}


def _series_dir(table_dir: Path, layer: int) -> Path:
    """Where the per-layer copies of one layer of the table at `table_dir` live."""
    return table_dir.with_name(f"{table_dir.name}{SERIES_SUFFIX}") / f"layer-{layer}"


def _write_parquet(path: Path, tmp_dir: Path, parts: Iterable[pa.Table | pa.RecordBatch], schema: pa.Schema,
                   row_group_rows: int, *, durable: bool = True) -> None:
    """Write `parts` as one zstd Parquet file with page checksums at `path`, atomically (and fsynced if `durable`)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(handle: Any) -> None:
        with pq.ParquetWriter(handle, schema, compression="zstd", write_page_checksum=True) as writer:
            for group in _row_groups(parts, schema, row_group_rows):
                writer.write_table(group, row_group_size=row_group_rows)

    _write_file_atomic(path, tmp_dir, write, durable=durable)


def _row_groups(parts: Iterable[pa.Table | pa.RecordBatch], schema: pa.Schema,
                row_group_rows: int) -> Iterator[pa.Table]:
    """The parts regrouped into tables of `row_group_rows` rows (the last one shorter): a compaction
    reads many small segments and must not write one tiny row group per segment."""
    pending: list[pa.Table] = []
    pending_rows = 0
    for part in parts:
        table = pa.Table.from_batches([part]) if isinstance(part, pa.RecordBatch) else part
        pending.append(table.cast(schema))
        pending_rows += table.num_rows
        if pending_rows >= row_group_rows:
            merged = pa.concat_tables(pending)
            full = pending_rows - pending_rows % row_group_rows
            yield merged.slice(0, full)
            pending, pending_rows = [merged.slice(full)], pending_rows - full
    if pending_rows:
        yield pa.concat_tables(pending)


def _step_range(data: pa.Table) -> tuple[int, int]:
    """The lowest and highest step in a batch of rows."""
    low, high = pc.min_max(data["step"]).values()
    return low.as_py(), high.as_py()


def _segment_order(segment: Segment) -> tuple[int, int, str]:
    """Segments in step order, ties by name."""
    return segment.first, segment.last, segment.name


def _check_version(folder: Path, version: object) -> None:
    """SchemaVersionError unless `version` is an integer this code can read."""
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{folder}: schema version {version!r} cannot be read by this code (schema version {SCHEMA_VERSION}); "
            "a newer vpmoe wrote it, or it is not a vpmoe store")


def _config_hash(run_id: str, config: Mapping[str, Any]) -> str:
    """sha256 of the config's canonical JSON (first 16 hex digits)."""
    try:
        blob = json.dumps(config, sort_keys=True).encode()
    except (TypeError, ValueError) as error:
        raise StoreError(f"run {run_id}: manifest['config'] is not JSON-serialisable: {error}") from error
    return hashlib.sha256(blob).hexdigest()[:16]


def _checked_manifest(run_id: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """`manifest` as plain JSON values, else StoreError naming a key that is reserved, missing or mistyped."""
    reserved = sorted(RESERVED_MANIFEST_KEYS & manifest.keys())
    if reserved:
        raise StoreError(f"run {run_id}: manifest keys {reserved} are set by the store; leave them out")
    for key in ("config", "kernels", "data"):
        if not isinstance(manifest.get(key, {}), Mapping):
            raise StoreError(f"run {run_id}: manifest[{key!r}] must be a dict, got {type(manifest[key]).__name__}")
    if "config" not in manifest:
        raise StoreError(f"run {run_id}: manifest needs a 'config' dict")
    try:
        return json.loads(json.dumps(manifest))
    except (TypeError, ValueError) as error:
        raise StoreError(f"run {run_id}: manifest is not JSON-serialisable: {error}") from error


def _writer_identity() -> dict[str, Any]:
    """Who writes a run: this process's pid, host and start time (readers check it is still alive)."""
    return {"pid": os.getpid(), "hostname": socket.gethostname(), "process_start": _process_start(os.getpid())}


class RunWriter:
    """Buffers one run's rows in memory and writes them as atomic Parquet segments.

    Flushes happen when a new step begins and `flush_every_steps` steps or `flush_every_s` seconds
    have gathered, so a step's rows of all tables land together. The writer's fresh segments are merged
    after `compact_every_flushes` flushes (0: never while recording) or once they hold COMPACT_FILE_ROWS
    rows of one table, whichever comes first. Not thread-safe: one recorder. A
    daemon thread writes the heartbeat while the writer is open, so a long evaluation or checkpoint
    save with nothing to append does not make the run look dead.
    """

    def __init__(self, store: Store, run_dir: Path, manifest: dict[str, Any], *, flush_every_steps: int,
                 flush_every_s: float, compact_every_flushes: int) -> None:
        """Use Store.create_run or Store.resume_run; this is their return value."""
        self._store = store
        self._run_dir = run_dir
        self._manifest = manifest
        self._flush_every_steps = flush_every_steps
        self._flush_every_s = flush_every_s
        self._compact_every_flushes = compact_every_flushes
        self._buffer: dict[str, list[pa.Table]] = {}
        self._buffered_steps: set[int] = set()
        self._max_buffered_step = -1
        self._writer_token = os.urandom(4).hex()
        self._flushes = 0
        self._flushes_since_compaction = 0
        self._fresh_rows = 0  # rows of the largest table flushed since the last minor compaction
        self._last_flush = time.monotonic()
        self._last_step: int | None = None
        self._closed = False
        # The beat thread and the recorder both write heartbeat.json through the same temp name.
        self._heartbeat_lock = threading.Lock()
        self.heartbeat()
        self._stop_beating = threading.Event()
        # The thread holds the writer weakly, so a writer dropped without close() stops beating (readers on
        # other hosts then see the run go stale; on this host the writer's process still counts as alive).
        weakref.finalize(self, self._stop_beating.set)
        self._beat_thread = threading.Thread(
            target=_beat_until_stopped, name=f"vpmoe-heartbeat-{self.run_id}", daemon=True,
            args=(weakref.ref(self), self._stop_beating, min(5.0, store.stale_after_s / 4)))
        self._beat_thread.start()

    @property
    def run_id(self) -> str:
        """The run this writer records."""
        return self._run_dir.name

    def append(self, table: str, columns: Mapping[str, Any]) -> None:
        """Buffer rows for `table` (run_id is filled in; scalars are repeated); may flush earlier steps first."""
        if self._closed:
            raise StoreError(f"run {self.run_id}: the writer is closed")
        batch = validate_batch(table, columns, self.run_id)
        if batch.num_rows == 0:
            return
        first, last = _step_range(batch)
        if first > self._max_buffered_step and self._buffered_steps and self._flush_due():
            self.flush()
        self._buffer.setdefault(table, []).append(batch)
        self._buffered_steps.update(pc.unique(batch["step"]).to_pylist())
        self._max_buffered_step = max(self._max_buffered_step, last)

    def flush(self) -> None:
        """Write one segment per table with buffered rows; when this returns, those steps are acknowledged."""
        tables = {name: pa.concat_tables(parts).sort_by([(key, "ascending") for key in TABLES[name].sort_key])
                  for name, parts in self._buffer.items() if parts}
        if not tables:
            self.heartbeat()
            return
        if "router_load" in tables:
            tables.update(self._store._rollups(tables["router_load"]))
        self._flushes += 1
        token = f"seg-{self._writer_token}-{self._flushes:06d}"
        # steps goes last: a step whose steps row is visible has all its other rows visible too.
        for name in sorted(tables, key=lambda table: table == "steps"):
            self._store._write_segment(self._run_dir, name, [tables[name]], _step_range(tables[name]), token)
            self._buffer.pop(name, None)
        if "steps" in tables:
            self._last_step = max(self._last_step or 0, pc.max(tables["steps"]["step"]).as_py())
        self._buffered_steps.clear()
        self._max_buffered_step = -1
        self._last_flush = time.monotonic()
        self.heartbeat()
        self._flushes_since_compaction += 1
        self._fresh_rows += max(table.num_rows for table in tables.values())
        # A live reader scans fresh segments whole, so they are merged (and split by layer) once they would fill
        # a compacted file, even before compact_every_flushes flushes (a large model fills one in a few).
        due = (self._flushes_since_compaction >= self._compact_every_flushes
               or self._fresh_rows >= COMPACT_FILE_ROWS)
        if self._compact_every_flushes and due and self._compact_small_segments():
            self._flushes_since_compaction = self._fresh_rows = 0

    def heartbeat(self) -> None:
        """Tell readers this writer is alive (the beat thread calls it; any thread may)."""
        with self._heartbeat_lock:
            _write_json_atomic(self._run_dir / HEARTBEAT, self._run_dir / "tmp",
                               {"time": time.time(), "last_step": self._last_step}, durable=False)

    def close(self, status: str = "complete", **final_fields: Any) -> None:
        """Flush, compact and build roll-ups (if complete), then rewrite the manifest with `status` last."""
        if self._closed:
            return
        if status not in CLOSING_STATUSES:
            raise StoreError(f"run {self.run_id}: close status must be one of {CLOSING_STATUSES}, got {status!r}")
        try:
            json.dumps(final_fields)
        except (TypeError, ValueError) as error:
            raise StoreError(f"run {self.run_id}: final fields are not JSON-serialisable: {error}") from error
        try:
            self.flush()
            if status == "complete":
                self._store.compact(self.run_id)
        finally:
            # Beats stop before the final manifest (nothing of this writer touches the run once it is closed),
            # and also when flushing fails, so that the run does not look alive after the failure.
            self._stop_beating.set()
            self._beat_thread.join()
        self._manifest = {**self._manifest, "status": status, "finished_at": _now_iso(), "final": final_fields}
        _write_json_atomic(self._run_dir / MANIFEST, self._run_dir / "tmp", self._manifest)
        self._closed = True

    def _flush_due(self) -> bool:
        """True when enough steps or seconds have gathered since the last flush."""
        return (len(self._buffered_steps) >= self._flush_every_steps
                or time.monotonic() - self._last_flush >= self._flush_every_s)

    def _compact_small_segments(self) -> bool:
        """Merge this run's small segments so a live reader opens few files; skipped (False) if a compaction runs."""
        with self._store._run_lock(self._run_dir, wait=False) as held:
            if held:
                for table in TABLES:
                    self._store._compact_table(self._run_dir, table, major=False)
                for table in SERIES_TABLES:
                    self._store._refresh_series(self._run_dir, table)
                self._store._update_bias_drift(self._run_dir, recording=True)
        return held

    def __enter__(self) -> RunWriter:
        """The writer itself."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Close as complete, or as failed when the block raised (never complete then)."""
        if exc is None:
            self.close("complete")
            return
        self._close_after_error(exc)

    def _close_after_error(self, error: BaseException) -> None:
        """Close as failed; a failure to do so is added to `error` as a note, not raised over it."""
        try:
            self.close("failed")
        except Exception as close_error:
            error.add_note(f"closing run {self.run_id} as failed also failed: {close_error!r}")


def _beat_until_stopped(writer_ref: weakref.ref[RunWriter], stop: threading.Event, interval: float) -> None:
    """Write the writer's heartbeat every `interval` s until `stop` is set or the writer is garbage collected."""
    while not stop.wait(interval):
        writer = writer_ref()
        if writer is None:
            return
        # A failed beat only makes readers see the run as stale sooner; the recorder's own writes report
        # the disk error.
        with contextlib.suppress(OSError):
            writer.heartbeat()
        del writer

