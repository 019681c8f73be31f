"""The durable ledger: which sample lives in which (shard, slice) cell, and the deletion journal.

One SQLite file (standard library ``sqlite3`` only) opened in WAL mode with ``synchronous=FULL`` and
foreign keys on. Every mutation runs in a single ``BEGIN IMMEDIATE ... COMMIT`` transaction, and all
validation happens inside it before anything is written, so a process killed at any point, or an
error raised at any point, leaves the database as it was before the call or with the whole call
applied, never in between.

Schema (version 2; ``meta.schema_version``)
-------------------------------------------
``meta(key TEXT PK, value TEXT)``
    ``schema_version`` = ``"2"``.
``datasets(name PK, m, L, seed, key_hex, source, n_samples, created_at)``
    ``m`` shards by ``L`` slices; ``key_hex`` is the HMAC key of the assignment rule; ``n_samples``
    counts all samples ever registered (deleted ones included).
``samples(dataset, sample_id, idx, shard, slice, content_hash, record_json, deleted_request, content_hmac)``
    PK ``(dataset, sample_id)``, UNIQUE ``(dataset, idx)``, index ``(dataset, shard, slice, idx)``
    and a partial index on ``deleted_request``. For a live sample ``record_json`` is the canonical JSON
    of the normalised record (``records.canonical_json``), so ``sha256(record_json) == content_hash``.
    ``deleted_request`` is NULL while the sample is live, else the request that deleted it (an FK
    to ``deletion_requests``). A deleted sample is a **tombstone**: in the transaction that deletes
    it, ``record_json`` and ``content_hash`` become NULL and ``content_hmac`` = HMAC-SHA256 of the record's
    canonical JSON under the ledger's secret tombstone key (:attr:`Ledger.tombstone_key`: random, in a
    0600 file beside the database, never in it; a plain hash would confirm a guessed text, the keyed one
    lets the key holder check that a file the user passes holds the deleted record). With
    ``PRAGMA secure_delete`` on and :meth:`Ledger.erase` (WAL checkpoint + VACUUM) after a deletion,
    the bytes are gone from the database file and its WAL. Triggers forbid changing ``dataset/
    sample_id/idx/shard/slice``, changing content other than erasing it once on deletion, and
    un-deleting or re-attributing a deleted sample. (Schema 1 kept deleted records verbatim;
    :func:`migrate` upgrades such a ledger in place and erases them.)
``slices(dataset, shard, slice, n_live, content_hash)``
    PK ``(dataset, shard, slice)``, one row per cell (all ``m*L`` cells, empty ones included).
    ``content_hash`` = :func:`slice_content_hash` of the content hashes of the cell's LIVE samples:
    sha256 over the sorted hex hashes, each followed by ``"\\n"`` (an empty cell hashes ``b""``).
    Recomputed for the touched cells in the same transaction that deletes samples. A block trained
    on slice hashes H is still valid iff the current hashes equal H.
``deletion_requests(request_id PK, dataset, sample_ids_json, received_at, planned_at, applied_at,
status, plan_json, note)``
    ``status`` in ``received < planned < applied``. Append-only: triggers RAISE(ABORT) on DELETE, on
    an UPDATE that changes ``request_id/dataset/sample_ids_json/received_at``, on an UPDATE that
    moves ``status`` backwards, and on any change to an applied request.
``deletion_events(seq INTEGER PK AUTOINCREMENT, request_id, event, at, payload_json)``
    Append-only (triggers forbid UPDATE and DELETE). Every status change appends a row in the same
    transaction: ``received`` (payload: n_ids, newly_deleted, touched cells), ``planned`` /
    ``replanned`` (payload: the plan), ``applied`` (payload: the note).

Assignment rule (stable, keyed, seeded; written once)
-----------------------------------------------------
``key = sha256(f"s3t-ledger:{seed}")`` unless a key is given. At the first registration all samples
are ordered by ``HMAC-SHA256(key, sample_id)`` (hex; ties, which do not happen, by sample_id) and the
sample at position ``idx`` gets ``shard = idx % m`` and ``slice = (idx // m) % L``, which balances
the cells exactly (every cell holds ``n // (m*L)`` or one more). A later registration of the same
dataset that brings NEW sample ids orders only those new ids by the same HMAC and appends them at
``idx = n_samples, n_samples + 1, ...`` with the same formula, so the round-robin continues (the
cells stay balanced to within one) and no earlier sample moves. Nothing ever changes a sample's
cell afterwards; deletions only set ``deleted_request``.

Times are ISO-8601 UTC strings with microseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sqlite3
import time
import uuid
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import records as _records

__all__ = [
    "SCHEMA_VERSION",
    "STATUSES",
    "LedgerError",
    "UnknownSampleError",
    "DatasetInfo",
    "RegisterResult",
    "DeletionRequest",
    "Ledger",
    "default_key",
    "slice_content_hash",
    "check_request_id",
    "content_hmac",
    "migrate",
]

SCHEMA_VERSION = 2
#: Request statuses, in the only order they may move.
STATUSES = ("received", "planned", "applied")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
#: Request ids name certificate files: a safe alphabet, a length limit, no path characters.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_request_id(request_id: Any) -> str:
    """A request id is 1-128 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit."""
    if not isinstance(request_id, str) or not REQUEST_ID_RE.fullmatch(request_id):
        shown = repr(request_id) if not isinstance(request_id, str) else repr(request_id[:40]) + (
            f"... ({len(request_id)} characters)" if len(request_id) > 40 else "")
        raise LedgerError(f"request_id {shown} is not allowed: use 1-128 characters of letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
    return request_id


def content_hmac(key_hex: str, record_json: str) -> str:
    """The tombstone of a deleted record: HMAC-SHA256 of its canonical JSON under the tombstone key."""
    return hmac.new(bytes.fromhex(key_hex), record_json.encode("utf-8"), hashlib.sha256).hexdigest()
_CHUNK = 500  # ids per IN (...) query, well under SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    name       TEXT PRIMARY KEY,
    m          INTEGER NOT NULL CHECK (m >= 1),
    L          INTEGER NOT NULL CHECK (L >= 1),
    seed       INTEGER NOT NULL,
    key_hex    TEXT NOT NULL,
    source     TEXT,
    n_samples  INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deletion_requests (
    request_id      TEXT PRIMARY KEY,
    dataset         TEXT NOT NULL REFERENCES datasets(name),
    sample_ids_json TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    planned_at      TEXT,
    applied_at      TEXT,
    status          TEXT NOT NULL CHECK (status IN ('received', 'planned', 'applied')),
    plan_json       TEXT,
    note            TEXT
);
CREATE INDEX IF NOT EXISTS deletion_requests_dataset ON deletion_requests(dataset, status);
CREATE TABLE IF NOT EXISTS deletion_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id   TEXT NOT NULL REFERENCES deletion_requests(request_id),
    event        TEXT NOT NULL,
    at           TEXT NOT NULL,
    payload_json TEXT
);
CREATE INDEX IF NOT EXISTS deletion_events_request ON deletion_events(request_id, seq);
CREATE TABLE IF NOT EXISTS samples (
    dataset         TEXT NOT NULL REFERENCES datasets(name),
    sample_id       TEXT NOT NULL,
    idx             INTEGER NOT NULL,
    shard           INTEGER NOT NULL,
    slice           INTEGER NOT NULL,
    content_hash    TEXT,
    record_json     TEXT,
    deleted_request TEXT REFERENCES deletion_requests(request_id),
    content_hmac    TEXT,
    PRIMARY KEY (dataset, sample_id),
    UNIQUE (dataset, idx)
);
CREATE INDEX IF NOT EXISTS samples_cell ON samples(dataset, shard, slice, idx);
CREATE INDEX IF NOT EXISTS samples_deleted ON samples(deleted_request)
    WHERE deleted_request IS NOT NULL;
CREATE TABLE IF NOT EXISTS slices (
    dataset      TEXT NOT NULL REFERENCES datasets(name),
    shard        INTEGER NOT NULL,
    slice        INTEGER NOT NULL,
    n_live       INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    PRIMARY KEY (dataset, shard, slice)
);

CREATE TRIGGER IF NOT EXISTS samples_cell_immutable
BEFORE UPDATE ON samples
WHEN NEW.dataset IS NOT OLD.dataset OR NEW.sample_id IS NOT OLD.sample_id
  OR NEW.idx IS NOT OLD.idx OR NEW.shard IS NOT OLD.shard OR NEW.slice IS NOT OLD.slice
BEGIN
    SELECT RAISE(ABORT, 'samples: a registered sample and its cell never change');
END;
CREATE TRIGGER IF NOT EXISTS samples_content_only_erased
BEFORE UPDATE OF content_hash, record_json, content_hmac ON samples
WHEN NOT (
    (NEW.content_hash IS OLD.content_hash AND NEW.record_json IS OLD.record_json
     AND NEW.content_hmac IS OLD.content_hmac)
    OR (NEW.deleted_request IS NOT NULL AND NEW.record_json IS NULL AND NEW.content_hash IS NULL
        AND OLD.content_hmac IS NULL AND NEW.content_hmac IS NOT NULL))
BEGIN
    SELECT RAISE(ABORT, 'samples: content never changes; it is only erased (once) when deleted');
END;
CREATE TRIGGER IF NOT EXISTS samples_deletion_final
BEFORE UPDATE OF deleted_request ON samples
WHEN OLD.deleted_request IS NOT NULL AND NEW.deleted_request IS NOT OLD.deleted_request
BEGIN
    SELECT RAISE(ABORT, 'samples: a deleted sample stays deleted by the same request');
END;

CREATE TRIGGER IF NOT EXISTS deletion_requests_no_delete
BEFORE DELETE ON deletion_requests
BEGIN
    SELECT RAISE(ABORT, 'deletion_requests is append-only: rows cannot be deleted');
END;
CREATE TRIGGER IF NOT EXISTS deletion_requests_immutable
BEFORE UPDATE ON deletion_requests
WHEN NEW.request_id IS NOT OLD.request_id OR NEW.dataset IS NOT OLD.dataset
  OR NEW.sample_ids_json IS NOT OLD.sample_ids_json OR NEW.received_at IS NOT OLD.received_at
BEGIN
    SELECT RAISE(ABORT,
        'deletion_requests: request_id, dataset, sample_ids and received_at are immutable');
END;
CREATE TRIGGER IF NOT EXISTS deletion_requests_status_forward
BEFORE UPDATE OF status ON deletion_requests
WHEN (CASE NEW.status WHEN 'received' THEN 0 WHEN 'planned' THEN 1 WHEN 'applied' THEN 2 END)
   < (CASE OLD.status WHEN 'received' THEN 0 WHEN 'planned' THEN 1 WHEN 'applied' THEN 2 END)
BEGIN
    SELECT RAISE(ABORT,
        'deletion_requests: status may only move forward (received < planned < applied)');
END;
CREATE TRIGGER IF NOT EXISTS deletion_requests_applied_final
BEFORE UPDATE ON deletion_requests
WHEN OLD.status = 'applied' AND (NEW.status IS NOT OLD.status
  OR NEW.planned_at IS NOT OLD.planned_at OR NEW.applied_at IS NOT OLD.applied_at
  OR NEW.plan_json IS NOT OLD.plan_json OR NEW.note IS NOT OLD.note)
BEGIN
    SELECT RAISE(ABORT, 'deletion_requests: an applied request is final');
END;
CREATE TRIGGER IF NOT EXISTS deletion_events_no_delete
BEFORE DELETE ON deletion_events
BEGIN
    SELECT RAISE(ABORT, 'deletion_events is append-only: rows cannot be deleted');
END;
CREATE TRIGGER IF NOT EXISTS deletion_events_no_update
BEFORE UPDATE ON deletion_events
BEGIN
    SELECT RAISE(ABORT, 'deletion_events is append-only: rows cannot be changed');
END;
"""


class LedgerError(ValueError):
    """Bad input to the ledger. The message names the problem; the database is unchanged."""


class UnknownSampleError(LedgerError):
    """Sample ids that the dataset does not hold. ``unknown`` lists all of them."""

    def __init__(self, dataset: str, unknown: list[str]):
        self.dataset = dataset
        self.unknown = list(unknown)
        shown = ", ".join(repr(s) for s in self.unknown[:10])
        more = f" and {len(self.unknown) - 10} more" if len(self.unknown) > 10 else ""
        super().__init__(
            f"dataset {dataset!r}: {len(self.unknown)} unknown sample id(s): {shown}{more}"
        )


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    m: int
    L: int
    seed: int
    n_samples: int  # all samples ever registered, deleted ones included
    n_live: int  # samples not deleted
    source: str | None
    created_at: str


@dataclass(frozen=True)
class RegisterResult:
    dataset: str
    n_new: int  # samples written by this call
    n_existing: int  # distinct ids already registered with the same content (left untouched)
    n_duplicates_collapsed: int  # extra records in this call with an id+content seen earlier in it
    seconds: float


@dataclass(frozen=True)
class DeletionRequest:
    request_id: str
    dataset: str
    sample_ids: tuple[str, ...]
    status: str
    received_at: str
    planned_at: str | None
    applied_at: str | None
    plan: dict | None
    newly_deleted: tuple[str, ...]  # ids this request deleted (not deleted before), request order
    note: str | None = None


def default_key(seed: int) -> bytes:
    """The assignment HMAC key for ``seed``: ``sha256(f"s3t-ledger:{seed}")`` (32 bytes)."""
    return hashlib.sha256(f"s3t-ledger:{seed}".encode()).digest()


def slice_content_hash(content_hashes: Iterable[str]) -> str:
    """sha256 hex over the sorted content hashes, each followed by ``"\\n"``."""
    h = hashlib.sha256()
    for c in sorted(content_hashes):
        h.update(c.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise LedgerError(
            f"dataset name must be a non-empty string of [A-Za-z0-9._-], got {name!r}"
        )
    return name


def _check_int(what: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise LedgerError(f"{what} must be >= {minimum}, got {value}")
    return value


def _id_list(sample_ids: Any, what: str = "sample_ids") -> list[str]:
    if isinstance(sample_ids, (str, bytes)):
        raise LedgerError(f"{what} must be a list of ids, not a single {type(sample_ids).__name__}")
    try:
        items = list(sample_ids)
    except TypeError:
        raise LedgerError(f"{what} must be a list of ids, got {type(sample_ids).__name__}") from None
    out = []
    for i, s in enumerate(items):
        if isinstance(s, bool) or not isinstance(s, (str, int)):
            raise LedgerError(f"{what}[{i}] must be a string id, got {type(s).__name__} {s!r}")
        out.append(str(s))
    return out


def _chunks(seq: list, n: int = _CHUNK) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class Ledger:
    """The ledger database at ``path`` (created with its parent folders and schema if missing).

    Use as a context manager or call :meth:`close`. One connection per instance; several processes
    may open the same file (writers serialise on ``BEGIN IMMEDIATE``, waiting up to ``timeout`` s).
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0):
        self.path = Path(path)
        memory = str(path) == ":memory:"
        if not memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(str(path), isolation_level=None, timeout=timeout)
        except sqlite3.Error as e:
            raise LedgerError(f"{path}: cannot open ledger: {e}") from None
        self._con = con
        self._tkey: str | None = None
        try:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if not memory and mode.lower() != "wal":
                raise LedgerError(f"{path}: could not switch the ledger to WAL mode (got {mode})")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA secure_delete=ON")  # freed bytes (erased records) are overwritten
            self._init_schema()
        except sqlite3.DatabaseError as e:
            con.close()
            raise LedgerError(f"{path}: not a usable ledger database: {e}") from None
        except BaseException:
            con.close()
            raise

    # -- plumbing -----------------------------------------------------------------------------

    def _init_schema(self) -> None:
        with self._write() as con:
            has_meta = con.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone()
            row = has_meta and con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row and row[0] != str(SCHEMA_VERSION):
                raise LedgerError(
                    f"{self.path}: ledger schema version {row[0]}, this code reads {SCHEMA_VERSION}; "
                    f"upgrade it in place with `s3t migrate {self.path.parent}` (erases the records of "
                    "deleted samples, which schema 1 kept)"
                )
            # (executescript would COMMIT our transaction, so run the statements one by one)
            for stmt in _split_sql(_SCHEMA):
                con.execute(stmt)
            if row is None:
                con.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif row[0] != str(SCHEMA_VERSION):
                raise LedgerError(
                    f"{self.path}: ledger schema version {row[0]}, this code reads {SCHEMA_VERSION}"
                )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        con = self._con
        con.execute("BEGIN")
        try:
            yield con
        finally:
            if con.in_transaction:
                con.execute("COMMIT")

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    def _dataset_row(self, con: sqlite3.Connection, name: str) -> sqlite3.Row | tuple:
        _check_name(name)
        row = con.execute(
            "SELECT name, m, L, seed, key_hex, source, n_samples, created_at FROM datasets "
            "WHERE name=?",
            (name,),
        ).fetchone()
        if row is None:
            known = [r[0] for r in con.execute("SELECT name FROM datasets ORDER BY name")]
            raise LedgerError(f"unknown dataset {name!r} (known: {', '.join(known) or 'none'})")
        return row

    def _lookup(self, con: sqlite3.Connection, name: str, ids: list[str]) -> dict[str, tuple]:
        """sample_id -> (shard, slice, deleted_request) for the ids that exist."""
        found: dict[str, tuple] = {}
        for chunk in _chunks(ids):
            q = (
                "SELECT sample_id, shard, slice, deleted_request FROM samples "
                f"WHERE dataset=? AND sample_id IN ({','.join('?' * len(chunk))})"
            )
            for sid, shard, sl, deleted in con.execute(q, (name, *chunk)):
                found[sid] = (shard, sl, deleted)
        return found

    def _recompute_slices(
        self, con: sqlite3.Connection, name: str, cells: Iterable[tuple[int, int]]
    ) -> None:
        upsert = (
            "INSERT INTO slices(dataset, shard, slice, n_live, content_hash) VALUES (?,?,?,?,?) "
            "ON CONFLICT(dataset, shard, slice) DO UPDATE SET "
            "n_live=excluded.n_live, content_hash=excluded.content_hash"
        )
        rows = []
        for shard, sl in sorted(set(cells)):
            hashes = [
                r[0]
                for r in con.execute(
                    "SELECT content_hash FROM samples WHERE dataset=? AND shard=? AND slice=? "
                    "AND deleted_request IS NULL",
                    (name, shard, sl),
                )
            ]
            rows.append((name, shard, sl, len(hashes), slice_content_hash(hashes)))
        con.executemany(upsert, rows)

    # -- datasets -----------------------------------------------------------------------------

    def register(
        self,
        name: str,
        records: Iterable[dict],
        *,
        m: int,
        L: int,
        seed: int = 0,
        source: str | None = None,
        key: bytes | str | None = None,
    ) -> RegisterResult:
        """Register ``records`` as dataset ``name`` split into ``m`` shards by ``L`` slices.

        Each record is validated and identified with :mod:`s3t_llm.records` (sample id = its
        ``id`` field or ``"h" + content_hash[:20]``). Within one call, records with the same id and
        the same content collapse into one sample (counted in ``n_duplicates_collapsed``); the same
        id with different content is a :class:`LedgerError`.

        Re-registering an existing dataset needs the same ``m``, ``L``, ``seed`` (and ``key``):
        ids already present with the same content are counted in ``n_existing`` and left as they
        are (a deleted sample stays deleted); an id whose content changed is a LedgerError
        ("record X changed since registration"); new ids are appended after the existing samples
        (see the module docstring). ``source`` is recorded at the first registration only.
        ``key`` (bytes or hex) replaces the seed-derived HMAC key.

        All validation happens before anything is written; the write is one transaction.
        """
        t0 = time.perf_counter()
        _check_name(name)
        _check_int("m", m, 1)
        _check_int("L", L, 1)
        _check_int("seed", seed)
        if source is not None and not isinstance(source, str):
            raise LedgerError(f"source must be a string or None, got {type(source).__name__}")
        if key is None:
            key_bytes = default_key(seed)
        elif isinstance(key, (bytes, bytearray)):
            key_bytes = bytes(key)
        elif isinstance(key, str):
            try:
                key_bytes = bytes.fromhex(key)
            except ValueError:
                raise LedgerError("key must be bytes or a hex string") from None
        else:
            raise LedgerError(f"key must be bytes or a hex string, got {type(key).__name__}")
        if not key_bytes:
            raise LedgerError("key must not be empty")

        # Identify every record before touching the database.
        by_id: dict[str, tuple[str, str, int]] = {}  # sample_id -> (content_hash, json, index)
        n_dup = 0
        if isinstance(records, (str, bytes, dict)):
            raise LedgerError(f"records must be an iterable of record dicts, got {type(records).__name__}")
        for i, rec in enumerate(records):
            try:
                sid, chash, text = _records.identify(rec, f"record {i}")
            except _records.RecordError as e:
                raise LedgerError(f"dataset {name!r}: {e}") from None
            prev = by_id.get(sid)
            if prev is None:
                by_id[sid] = (chash, text, i)
            elif prev[0] == chash:
                n_dup += 1
            else:
                raise LedgerError(
                    f"dataset {name!r}: sample id {sid!r} appears with different content "
                    f"(records {prev[2]} and {i})"
                )
        if not by_id:
            raise LedgerError(f"dataset {name!r}: no records to register")

        with self._write() as con:
            row = con.execute(
                "SELECT m, L, seed, key_hex, n_samples FROM datasets WHERE name=?", (name,)
            ).fetchone()
            existing: dict[str, str] = {}
            if row is not None:
                om, oL, oseed, okey, n_before = row
                if (om, oL, oseed) != (m, L, seed):
                    raise LedgerError(
                        f"dataset {name!r} is registered with m={om}, L={oL}, seed={oseed}; "
                        f"got m={m}, L={L}, seed={seed}"
                    )
                if okey != key_bytes.hex():
                    raise LedgerError(f"dataset {name!r} is registered with a different key")
                existing, hmacs = {}, {}
                for sid, chash, hm in con.execute(
                    "SELECT sample_id, content_hash, content_hmac FROM samples WHERE dataset=?", (name,)
                ):
                    existing[sid] = chash
                    if hm is not None:
                        hmacs[sid] = hm
                # A deleted sample is a tombstone: the same record again is recognised by its keyed
                # HMAC and stays deleted (never revived); a different record under its id is an error.
                changed = [
                    s for s, v in by_id.items() if s in existing and (
                        content_hmac(self.tombstone_key, v[1]) != hmacs[s] if s in hmacs
                        else existing[s] != v[0])
                ]
                if changed:
                    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
                    raise LedgerError(
                        f"dataset {name!r}: record {changed[0]!r} changed since registration "
                        f"(content hash differs){more}"
                    )
            else:
                n_before = 0

            new_ids = [s for s in by_id if s not in existing]
            if new_ids:
                order = sorted(
                    new_ids,
                    key=lambda s: (hmac.new(key_bytes, s.encode(), hashlib.sha256).hexdigest(), s),
                )
                rows = []
                for j, sid in enumerate(order):
                    idx = n_before + j
                    chash, text, _ = by_id[sid]
                    rows.append((name, sid, idx, idx % m, (idx // m) % L, chash, text))
                if row is None:
                    con.execute(
                        "INSERT INTO datasets(name, m, L, seed, key_hex, source, n_samples, "
                        "created_at) VALUES (?,?,?,?,?,?,?,?)",
                        (name, m, L, seed, key_bytes.hex(), source, len(rows), _now()),
                    )
                else:
                    con.execute(
                        "UPDATE datasets SET n_samples=? WHERE name=?", (n_before + len(rows), name)
                    )
                con.executemany(
                    "INSERT INTO samples(dataset, sample_id, idx, shard, slice, content_hash, "
                    "record_json) VALUES (?,?,?,?,?,?,?)",
                    rows,
                )
                if row is None:
                    cells = [(s, l) for s in range(m) for l in range(L)]
                else:
                    cells = [(r[3], r[4]) for r in rows]
                self._recompute_slices(con, name, cells)
        return RegisterResult(
            dataset=name,
            n_new=len(new_ids),
            n_existing=len(by_id) - len(new_ids),
            n_duplicates_collapsed=n_dup,
            seconds=time.perf_counter() - t0,
        )

    def register_file(
        self,
        name: str,
        path: str | Path,
        *,
        m: int,
        L: int,
        seed: int = 0,
        source: str | None = None,
        key: bytes | str | None = None,
    ) -> RegisterResult:
        """:meth:`register` the records of a JSON/JSONL file (``records.load_records``).

        ``source`` defaults to the path. A bad file raises :class:`LedgerError` (from the
        :class:`~s3t_llm.records.RecordError`)."""
        try:
            recs = _records.load_records(path)
        except _records.RecordError as e:
            raise LedgerError(str(e)) from e
        return self.register(
            name, recs, m=m, L=L, seed=seed, source=str(path) if source is None else source, key=key
        )

    def _info(self, con: sqlite3.Connection, row: tuple) -> DatasetInfo:
        name, m, L, seed, _key, source, n_samples, created_at = row
        n_live = con.execute(
            "SELECT COALESCE(SUM(n_live), 0) FROM slices WHERE dataset=?", (name,)
        ).fetchone()[0]
        return DatasetInfo(name, m, L, seed, n_samples, n_live, source, created_at)

    def datasets(self) -> list[DatasetInfo]:
        """All datasets, by name."""
        with self._read() as con:
            rows = con.execute(
                "SELECT name, m, L, seed, key_hex, source, n_samples, created_at FROM datasets "
                "ORDER BY name"
            ).fetchall()
            return [self._info(con, r) for r in rows]

    def dataset(self, name: str) -> DatasetInfo:
        """One dataset (:class:`LedgerError` if unknown)."""
        with self._read() as con:
            return self._info(con, self._dataset_row(con, name))

    def cell_of(self, name: str, sample_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """``{sample_id: (shard, slice)}``, deleted samples included (:class:`UnknownSampleError`)."""
        ids = _id_list(sample_ids)
        with self._read() as con:
            self._dataset_row(con, name)
            found = self._lookup(con, name, ids)
        unknown = [s for s in ids if s not in found]
        if unknown:
            raise UnknownSampleError(name, unknown)
        return {s: (found[s][0], found[s][1]) for s in ids}

    def cells_known(self, name: str, sample_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Like :meth:`cell_of` for the ids this dataset knows; other ids are left out."""
        ids = _id_list(sample_ids)
        with self._read() as con:
            self._dataset_row(con, name)
            return {s: (v[0], v[1]) for s, v in self._lookup(con, name, ids).items()}

    def _check_cell(self, row: tuple, shard: Any, sl: Any) -> None:
        name, m, L = row[0], row[1], row[2]
        _check_int("shard", shard)
        _check_int("slice", sl)
        if not (0 <= shard < m and 0 <= sl < L):
            raise LedgerError(
                f"dataset {name!r}: cell ({shard}, {sl}) out of range (m={m} shards, L={L} slices)"
            )

    def slice_samples(
        self, name: str, shard: int, slice: int, *, include_deleted: bool = False
    ) -> list[tuple[str, dict]]:
        """``[(sample_id, normalised record)]`` of one cell in ``idx`` order (live ones only
        unless ``include_deleted``; a deleted sample's record is ``None``: its content was erased)."""
        with self._read() as con:
            self._check_cell(self._dataset_row(con, name), shard, slice)
            q = (
                "SELECT sample_id, record_json FROM samples WHERE dataset=? AND shard=? AND slice=?"
                + ("" if include_deleted else " AND deleted_request IS NULL")
                + " ORDER BY idx"
            )
            return [(sid, None if text is None else json.loads(text))
                    for sid, text in con.execute(q, (name, shard, slice))]

    def slice_hash(self, name: str, shard: int, slice: int) -> str:
        """The content hash of one cell's live samples (see :func:`slice_content_hash`)."""
        with self._read() as con:
            self._check_cell(self._dataset_row(con, name), shard, slice)
            return con.execute(
                "SELECT content_hash FROM slices WHERE dataset=? AND shard=? AND slice=?",
                (name, shard, slice),
            ).fetchone()[0]

    def slice_hashes(self, name: str) -> dict[tuple[int, int], str]:
        """``{(shard, slice): content_hash}`` for all ``m*L`` cells."""
        with self._read() as con:
            self._dataset_row(con, name)
            return {
                (s, l): h
                for s, l, h in con.execute(
                    "SELECT shard, slice, content_hash FROM slices WHERE dataset=? "
                    "ORDER BY shard, slice",
                    (name,),
                )
            }

    def deleted_cells(self, name: str) -> dict[tuple[int, int], int]:
        """``{(shard, slice): number of deleted samples}`` for the cells with at least one."""
        with self._read() as con:
            self._dataset_row(con, name)
            return {
                (s, l): n
                for s, l, n in con.execute(
                    "SELECT shard, slice, COUNT(*) FROM samples WHERE dataset=? "
                    "AND deleted_request IS NOT NULL GROUP BY shard, slice ORDER BY shard, slice",
                    (name,),
                )
            }

    def is_deleted(self, name: str, sample_id: str) -> bool:
        """Whether the sample is deleted (:class:`UnknownSampleError` if unknown)."""
        ids = _id_list([sample_id], "sample_id")
        with self._read() as con:
            self._dataset_row(con, name)
            found = self._lookup(con, name, ids)
        if not found:
            raise UnknownSampleError(name, ids)
        return found[ids[0]][2] is not None

    def deleted_ids(self, name: str) -> set[str]:
        """All deleted sample ids of the dataset."""
        with self._read() as con:
            self._dataset_row(con, name)
            return {
                r[0]
                for r in con.execute(
                    "SELECT sample_id FROM samples WHERE dataset=? AND deleted_request IS NOT NULL",
                    (name,),
                )
            }

    # -- deletion journal ---------------------------------------------------------------------

    def _request(self, con: sqlite3.Connection, request_id: str) -> DeletionRequest:
        row = con.execute(
            "SELECT request_id, dataset, sample_ids_json, status, received_at, planned_at, "
            "applied_at, plan_json, note FROM deletion_requests WHERE request_id=?",
            (request_id,),
        ).fetchone()
        if row is None:
            raise LedgerError(f"unknown deletion request {request_id!r}")
        mine = {
            r[0]
            for r in con.execute(
                "SELECT sample_id FROM samples WHERE deleted_request=?", (request_id,)
            )
        }
        return self._make_request(row, mine)

    @staticmethod
    def _make_request(row: tuple, mine: set[str]) -> DeletionRequest:
        rid, dataset, ids_json, status, received, planned, applied, plan_json, note = row
        ids = tuple(json.loads(ids_json))
        return DeletionRequest(
            request_id=rid,
            dataset=dataset,
            sample_ids=ids,
            status=status,
            received_at=received,
            planned_at=planned,
            applied_at=applied,
            plan=None if plan_json is None else json.loads(plan_json),
            newly_deleted=tuple(s for s in ids if s in mine),
            note=note,
        )

    def _event(self, con: sqlite3.Connection, request_id: str, event: str, payload: Any) -> None:
        con.execute(
            "INSERT INTO deletion_events(request_id, event, at, payload_json) VALUES (?,?,?,?)",
            (request_id, event, _now(), json.dumps(payload, sort_keys=True)),
        )

    def journal_deletion(
        self, name: str, sample_ids: Iterable[str], *, request_id: str | None = None,
        also: Iterable[str] = (), context: dict | None = None,
    ) -> DeletionRequest:
        """Record a deletion request and mark its samples deleted, in one transaction.

        Validates all ids first: an empty list or duplicates -> :class:`LedgerError`, unknown ids
        -> :class:`UnknownSampleError`; nothing is written then. Otherwise inserts the request
        (status ``received``, event ``received``), sets ``deleted_request`` on the samples that
        were live and recomputes the hashes of the touched slices.

        ``request_id`` defaults to a uuid4 hex. Re-submitting a request_id with the same dataset
        and the same set of ids returns the existing request unchanged (idempotent); with other
        ids or another dataset it is a :class:`LedgerError`. Ids deleted by an earlier request are
        accepted: ``newly_deleted`` lists only the ones this request deleted, and a request with
        none is still journaled (callers treat it as a no-op).
        """
        ids = _id_list(sample_ids)
        if not ids:
            raise LedgerError(f"dataset {name!r}: empty deletion list")
        dups = sorted(s for s, k in Counter(ids).items() if k > 1)
        if dups:
            shown = ", ".join(repr(s) for s in dups[:10])
            raise LedgerError(f"dataset {name!r}: duplicate ids in deletion request: {shown}")
        if request_id is None:
            request_id = uuid.uuid4().hex
        check_request_id(request_id)
        for other in also:
            _check_name(other)

        with self._write() as con:
            self._dataset_row(con, name)
            prev = con.execute(
                "SELECT dataset, sample_ids_json FROM deletion_requests WHERE request_id=?",
                (request_id,),
            ).fetchone()
            if prev is not None:
                if prev[0] != name or set(json.loads(prev[1])) != set(ids):
                    raise LedgerError(
                        f"request {request_id!r} already exists with "
                        + (f"dataset {prev[0]!r}" if prev[0] != name else "different sample ids")
                    )
                return self._request(con, request_id)
            # Every dataset's copy of an id goes (a record may sit in training and held-out data alike).
            hits: list[tuple[str, str, tuple]] = []  # (dataset, sample_id, (shard, slice, deleted_request))
            for ds in [name] + [o for o in also if o != name]:
                self._dataset_row(con, ds)
                hits += [(ds, sid, v) for sid, v in self._lookup(con, ds, ids).items()]
            known = {sid for _, sid, _ in hits}
            unknown = [s for s in ids if s not in known]
            if unknown:
                raise UnknownSampleError(name, unknown)
            live = [(ds, sid, v) for ds, sid, v in hits if v[2] is None]
            newly = sorted({sid for _, sid, _ in live}, key=ids.index)
            con.execute(
                "INSERT INTO deletion_requests(request_id, dataset, sample_ids_json, received_at, "
                "status) VALUES (?,?,?,?, 'received')",
                (request_id, name, json.dumps(ids), _now()),
            )
            rows = []
            for ds, sid, _ in live:
                text = con.execute("SELECT record_json FROM samples WHERE dataset=? AND sample_id=?",
                                   (ds, sid)).fetchone()[0]
                rows.append((request_id, content_hmac(self.tombstone_key, text), ds, sid))
            # Deleting a sample erases its content in the same transaction: a tombstone stays.
            con.executemany(
                "UPDATE samples SET deleted_request=?, content_hmac=?, record_json=NULL, "
                "content_hash=NULL WHERE dataset=? AND sample_id=? AND deleted_request IS NULL",
                rows,
            )
            by_ds: dict[str, set] = defaultdict(set)
            for ds, _, v in live:
                by_ds[ds].add(v[:2])
            for ds, ds_cells in by_ds.items():
                self._recompute_slices(con, ds, ds_cells)
            cells = sorted(by_ds.get(name, set()))
            self._event(
                con,
                request_id,
                "received",
                {"n_ids": len(ids), "newly_deleted": newly, "touched_cells": cells,
                 "other_datasets": sorted(set(by_ds) - {name}), **({"context": context} if context else {})},
            )
            return self._request(con, request_id)

    def erase(self, attempts: int = 50) -> dict:
        """Make erased content unrecoverable from the files: checkpoint the WAL into the database and
        truncate it, VACUUM (rebuilds the file without free pages), checkpoint again. ``secure_delete`` is
        on for every connection, so freed cells were already zeroed. Retries while other connections
        hold read snapshots; returns what was done."""
        t0 = time.perf_counter()
        out = {"vacuum": False, "wal_truncated": False}
        for i in range(attempts):
            try:
                busy = self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if busy:
                    raise sqlite3.OperationalError("checkpoint busy")
                self._con.execute("VACUUM")
                out["vacuum"] = True
                busy = self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if busy:
                    raise sqlite3.OperationalError("checkpoint busy")
                out["wal_truncated"] = True
                break
            except sqlite3.OperationalError:
                time.sleep(0.02 * (i + 1))
        out["seconds"] = round(time.perf_counter() - t0, 4)
        if not out["wal_truncated"]:
            raise LedgerError(f"{self.path}: could not checkpoint and vacuum the ledger (other readers)")
        return out

    @property
    def tombstone_key(self) -> str:
        """The secret key of the tombstones' HMAC (hex): random, one per ledger, kept beside it in
        ``<ledger>.tombstone-key`` (mode 0600), never in the database (whoever holds a copy of the ledger
        alone cannot confirm a guessed deleted text) and never derived from the seed."""
        if self._tkey is None:
            if str(self.path) == ":memory:":
                self._tkey = os.urandom(32).hex()
            else:
                f = Path(str(self.path) + ".tombstone-key")
                try:
                    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w") as out:
                        out.write(os.urandom(32).hex())
                        out.flush()
                        os.fsync(out.fileno())
                except FileExistsError:
                    pass
                self._tkey = f.read_text().strip()
        return self._tkey

    def checkpoint(self, wait: bool = True) -> bool:
        """Copy the WAL into the database and truncate it (cheap; ``secure_delete`` already zeroed erased
        bytes in the new pages). False when other readers kept it from completing (``erase`` retries).
        ``wait=False``: do not wait for readers at all (a TRUNCATE checkpoint otherwise waits up to the
        connection's busy timeout, 30 s, for each one holding an old snapshot)."""
        old = None
        try:
            if not wait:
                old = self._con.execute("PRAGMA busy_timeout").fetchone()[0]
                self._con.execute("PRAGMA busy_timeout=0")
            return self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        except sqlite3.OperationalError:
            return False
        finally:
            if old is not None:
                self._con.execute(f"PRAGMA busy_timeout={int(old)}")

    def tombstone_matches(self, name: str, sample_id: str, record: dict) -> bool:
        """Whether ``record`` is the deleted sample's record (its keyed HMAC equals the tombstone's)."""
        try:
            _, _, text = _records.identify(record, f"record {sample_id!r}")
        except _records.RecordError as e:
            raise LedgerError(str(e)) from None
        with self._read() as con:
            self._dataset_row(con, name)
            row = con.execute("SELECT content_hmac FROM samples WHERE dataset=? AND sample_id=?",
                              (name, sample_id)).fetchone()
        if row is None:
            raise UnknownSampleError(name, [sample_id])
        return row[0] is not None and hmac.compare_digest(row[0], content_hmac(self.tombstone_key, text))

    def tombstones(self, name: str) -> dict[str, str]:
        """``{sample_id: content_hmac}`` of the dataset's deleted samples."""
        with self._read() as con:
            self._dataset_row(con, name)
            return dict(con.execute("SELECT sample_id, content_hmac FROM samples WHERE dataset=? "
                                    "AND deleted_request IS NOT NULL", (name,)))

    def key_hex(self, name: str) -> str:
        with self._read() as con:
            return self._dataset_row(con, name)[4]

    def mark_planned(self, request_id: str, plan: dict) -> DeletionRequest:
        """Attach the retraining ``plan`` (a JSON-serialisable dict) and move the request to
        ``planned``. A planned request may be re-planned (event ``replanned``); an applied one
        may not (:class:`LedgerError`)."""
        if not isinstance(plan, dict):
            raise LedgerError(f"plan must be a dict, got {type(plan).__name__}")
        try:
            plan_json = json.dumps(plan, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise LedgerError(f"plan is not JSON-serialisable: {e}") from None
        with self._write() as con:
            req = self._request(con, request_id)
            if req.status == "applied":
                raise LedgerError(f"request {request_id!r} is already applied; it cannot be planned")
            con.execute(
                "UPDATE deletion_requests SET status='planned', planned_at=?, plan_json=? "
                "WHERE request_id=?",
                (_now(), plan_json, request_id),
            )
            self._event(
                con, request_id, "replanned" if req.status == "planned" else "planned", plan
            )
            return self._request(con, request_id)

    def mark_applied(self, request_id: str, note: str | None = None) -> DeletionRequest:
        """Move the request to ``applied`` (from ``received`` or ``planned``) with an optional
        note. Marking an applied request again is a no-op that returns it unchanged."""
        if note is not None and not isinstance(note, str):
            raise LedgerError(f"note must be a string or None, got {type(note).__name__}")
        with self._write() as con:
            req = self._request(con, request_id)
            if req.status == "applied":
                return req
            con.execute(
                "UPDATE deletion_requests SET status='applied', applied_at=?, note=? "
                "WHERE request_id=?",
                (_now(), note, request_id),
            )
            self._event(con, request_id, "applied", {"note": note})
            return self._request(con, request_id)

    def request(self, request_id: str) -> DeletionRequest:
        """One request (:class:`LedgerError` if unknown)."""
        with self._read() as con:
            return self._request(con, request_id)

    def requests(self, name: str, status: str | None = None) -> list[DeletionRequest]:
        """The dataset's requests in received order, optionally only those with ``status``."""
        if status is not None and status not in STATUSES:
            raise LedgerError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        with self._read() as con:
            self._dataset_row(con, name)
            q = (
                "SELECT request_id, dataset, sample_ids_json, status, received_at, planned_at, "
                "applied_at, plan_json, note FROM deletion_requests WHERE dataset=?"
            )
            args: tuple = (name,)
            if status is not None:
                q += " AND status=?"
                args = (name, status)
            rows = con.execute(q + " ORDER BY rowid", args).fetchall()
            mine: dict[str, set[str]] = defaultdict(set)
            for rid, sid in con.execute(  # a request may delete samples of other datasets (held-out)
                "SELECT s.deleted_request, s.sample_id FROM samples s JOIN deletion_requests r "
                "ON r.request_id = s.deleted_request WHERE r.dataset=?",
                (name,),
            ):
                mine[rid].add(sid)
            return [self._make_request(r, mine.get(r[0], set())) for r in rows]

    def pending(self, name: str) -> list[DeletionRequest]:
        """Requests not yet applied (status received or planned), in received order."""
        return [r for r in self.requests(name) if r.status != "applied"]

    def events(self, request_id: str) -> list[dict]:
        """The request's events in order: ``{"seq", "request_id", "event", "at", "payload"}``."""
        with self._read() as con:
            self._request(con, request_id)
            return [
                {
                    "seq": seq,
                    "request_id": rid,
                    "event": ev,
                    "at": at,
                    "payload": None if payload is None else json.loads(payload),
                }
                for seq, rid, ev, at, payload in con.execute(
                    "SELECT seq, request_id, event, at, payload_json FROM deletion_events "
                    "WHERE request_id=? ORDER BY seq",
                    (request_id,),
                )
            ]

    # -- checking -----------------------------------------------------------------------------

    def verify(self, name: str | None = None) -> list[str]:
        """Re-derive everything derivable and return the problems found (empty list = consistent).

        Checks ``PRAGMA integrity_check``; per dataset (all, or ``name``): the sample count equals
        ``n_samples``, ``idx`` runs 0..n-1 and every cell follows the assignment rule,
        ``sha256(record_json) == content_hash``, every slice row matches a recomputation, every
        request's ids are all deleted and the samples attributed to a request are in its list, and
        every status reached has its event.
        """
        problems: list[str] = []
        with self._read() as con:
            ic = con.execute("PRAGMA integrity_check").fetchall()
            if ic != [("ok",)]:
                problems.append(f"integrity_check: {ic[:5]}")
            names = (
                [self._dataset_row(con, name)[0]]
                if name is not None
                else [r[0] for r in con.execute("SELECT name FROM datasets ORDER BY name")]
            )
            for ds in names:
                _, m, L, _seed, _key, _src, n_samples, _ = self._dataset_row(con, ds)
                live: dict[tuple[int, int], list[str]] = defaultdict(list)
                n = 0
                idxs = set()
                for sid, idx, shard, sl, chash, text, dreq, hm in con.execute(
                    "SELECT sample_id, idx, shard, slice, content_hash, record_json, "
                    "deleted_request, content_hmac FROM samples WHERE dataset=?",
                    (ds,),
                ):
                    n += 1
                    idxs.add(idx)
                    if (shard, sl) != (idx % m, (idx // m) % L):
                        problems.append(f"{ds}: sample {sid!r} idx {idx} is in cell ({shard}, {sl})")
                    if dreq is not None:
                        if text is not None or chash is not None or not hm:
                            problems.append(f"{ds}: deleted sample {sid!r} still holds content "
                                            "(or lacks its tombstone)")
                    elif text is None or hashlib.sha256(text.encode("utf-8")).hexdigest() != chash:
                        problems.append(f"{ds}: sample {sid!r} record_json does not match its hash")
                    if dreq is None:
                        live[(shard, sl)].append(chash)
                if n != n_samples:
                    problems.append(f"{ds}: {n} samples, datasets.n_samples says {n_samples}")
                if idxs != set(range(n)):
                    problems.append(f"{ds}: idx values are not 0..{n - 1}")
                stored = {
                    (s, l): (k, h)
                    for s, l, k, h in con.execute(
                        "SELECT shard, slice, n_live, content_hash FROM slices WHERE dataset=?",
                        (ds,),
                    )
                }
                for cell in [(s, l) for s in range(m) for l in range(L)]:
                    want = (len(live[cell]), slice_content_hash(live[cell]))
                    if stored.get(cell) != want:
                        problems.append(f"{ds}: slice {cell} stored {stored.get(cell)}, expected {want}")
                if len(stored) != m * L:
                    problems.append(f"{ds}: {len(stored)} slice rows, expected {m * L}")
                for rid, ids_json, status, planned_at, applied_at in con.execute(
                    "SELECT request_id, sample_ids_json, status, planned_at, applied_at "
                    "FROM deletion_requests WHERE dataset=?",
                    (ds,),
                ).fetchall():
                    ids = set(json.loads(ids_json))
                    live_ids = {}
                    for other in [ds] + [r[0] for r in con.execute("SELECT name FROM datasets WHERE name<>?",
                                                                    (ds,))]:
                        rest = sorted(ids - set(live_ids))
                        live_ids.update(self._lookup(con, other, rest))
                    not_deleted = [s for s in ids if s not in live_ids or live_ids[s][2] is None]
                    if not_deleted:
                        problems.append(
                            f"{ds}: request {rid!r} has {len(not_deleted)} ids not deleted"
                        )
                    if not all_deleted_by(con, rid) <= ids:
                        problems.append(f"{ds}: request {rid!r} deleted samples outside its list")
                    evs = {
                        r[0]
                        for r in con.execute(
                            "SELECT event FROM deletion_events WHERE request_id=?", (rid,)
                        )
                    }
                    needed = {"received"}
                    if planned_at is not None:
                        needed.add("planned")
                    if status == "applied":
                        needed.add("applied")
                    stamps = (planned_at is not None, applied_at is not None)
                    ok_stamps = {
                        "received": [(False, False)],
                        "planned": [(True, False)],
                        "applied": [(False, True), (True, True)],
                    }[status]
                    if stamps not in ok_stamps:
                        problems.append(f"{ds}: request {rid!r} status {status} vs its timestamps")
                    if not needed <= evs:
                        problems.append(f"{ds}: request {rid!r} lacks events {sorted(needed - evs)}")
        return problems


def all_deleted_by(con: sqlite3.Connection, request_id: str) -> set[str]:
    return {r[0] for r in con.execute("SELECT sample_id FROM samples WHERE deleted_request=?", (request_id,))}


def migrate(path: str | Path) -> dict:
    """Upgrade a schema-1 ledger in place to schema 2: the samples table is rebuilt with nullable content
    and tombstones, every deleted sample's record is erased (keyed HMAC kept), and the file is vacuumed.
    One transaction; a ledger already at schema 2 is left as it is."""
    path = Path(path)
    con = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    try:
        row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            raise LedgerError(f"{path}: not an s3t ledger (no schema version)")
        if row[0] == str(SCHEMA_VERSION):
            return {"from": SCHEMA_VERSION, "to": SCHEMA_VERSION, "erased": 0}
        if row[0] != "1":
            raise LedgerError(f"{path}: cannot migrate schema {row[0]}")
        con.execute("PRAGMA secure_delete=ON")
        con.execute("PRAGMA foreign_keys=OFF")
        con.execute("BEGIN IMMEDIATE")
        try:
            for (trig,) in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
                con.execute(f"DROP TRIGGER {trig}")
            con.execute("ALTER TABLE samples RENAME TO samples_v1")
            con.execute("DROP INDEX IF EXISTS samples_cell")
            con.execute("DROP INDEX IF EXISTS samples_deleted")
            for stmt in _split_sql(_SCHEMA):
                con.execute(stmt)
            tkey = Ledger.__new__(Ledger)
            tkey.path, tkey._tkey = path, None
            tkey = tkey.tombstone_key
            erased = 0
            for ds, sid, idx, shard, sl, chash, text, dreq in con.execute(
                    "SELECT dataset, sample_id, idx, shard, slice, content_hash, record_json, deleted_request "
                    "FROM samples_v1").fetchall():
                hm = None
                if dreq is not None:
                    hm, chash, text = content_hmac(tkey, text), None, None
                    erased += 1
                con.execute("INSERT INTO samples(dataset, sample_id, idx, shard, slice, content_hash, record_json, "
                            "deleted_request, content_hmac) VALUES (?,?,?,?,?,?,?,?,?)",
                            (ds, sid, idx, shard, sl, chash, text, dreq, hm))
            con.execute("DROP TABLE samples_v1")
            con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("PRAGMA foreign_keys=ON")
    finally:
        con.close()
    with Ledger(path) as led:
        led.erase()
    return {"from": 1, "to": SCHEMA_VERSION, "erased": erased}


def _split_sql(script: str) -> list[str]:
    """Split the schema script into statements (``sqlite3.complete_statement`` aware of triggers)."""
    stmts, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                stmts.append(buf.strip())
            buf = ""
    if buf.strip():
        stmts.append(buf.strip())
    return stmts
