"""Alpaca-format records: loading, validation and stable sample ids.

A record is a JSON object with string fields ``instruction`` and ``output``, an optional string
``input`` (missing means ``""``) and an optional ``id`` (str or int): the dataset's own id for that
record. Other fields are kept by :func:`load_records` but take no part in hashing.

Identity of a record:

- :func:`normalise` keeps only instruction/input/output, turns ``\\r\\n`` and lone ``\\r`` into ``\\n``,
  applies Unicode NFC and strips surrounding whitespace of each field.
- :func:`content_hash` is the sha256 hex digest of the canonical JSON of the normalised record
  (``sort_keys=True, ensure_ascii=False, separators=(",", ":")``, UTF-8).
- :func:`sample_id` is the record's own ``id`` (as a string) when it has one, else
  ``"h" + content_hash[:20]``: two records that differ only in whitespace or newline style get the
  same id.

Only the standard library is used (no torch), so the ledger and the CLI can load this quickly.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "RecordError",
    "TEXT_FIELDS",
    "validate_record",
    "load_records",
    "normalise",
    "canonical_json",
    "content_hash",
    "sample_id",
    "identify",
    "load_sample_ids",
]

#: The fields that make up a record's content (and its content hash).
TEXT_FIELDS = ("instruction", "input", "output")


class RecordError(ValueError):
    """Bad input: a malformed file, record or deletion list. The message names file, line/index and field."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def validate_record(record: Any, where: str = "record") -> dict:
    """Check one record and return a shallow copy with ``input`` defaulted to ``""``.

    ``where`` prefixes error messages (e.g. ``"data.json: record 17"``). Raises :class:`RecordError`
    if the record is not an object, ``instruction``/``output`` are missing or not strings, ``input``
    is present but not a string, or ``id`` is present but not a non-empty string or an int.
    Extra fields are kept unchanged.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {_type_name(record)}")
    for field in ("instruction", "output"):
        if field not in record:
            raise RecordError(f"{where}: field {field!r} is missing")
        if not isinstance(record[field], str):
            raise RecordError(
                f"{where}: field {field!r} must be a string, got {_type_name(record[field])}"
            )
    if "input" in record and not isinstance(record["input"], str):
        raise RecordError(f"{where}: field 'input' must be a string, got {_type_name(record['input'])}")
    if "id" in record:
        rid = record["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise RecordError(f"{where}: field 'id' must be a string or an integer, got {_type_name(rid)}")
        if isinstance(rid, str) and not rid.strip():
            raise RecordError(f"{where}: field 'id' is an empty string")
    out = dict(record)
    out.setdefault("input", "")
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RecordError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _json_error(path: Path, kind: str, e: json.JSONDecodeError, line: int | None = None) -> RecordError:
    lineno = e.lineno if line is None else line
    return RecordError(f"{path}: malformed {kind} at line {lineno}, column {e.colno}: {e.msg}")


def load_records(path: str | os.PathLike) -> list[dict]:
    """Load Alpaca records from a JSON list file or a JSONL file (one object per line).

    The format is decided by content, not by extension: a file whose first non-blank character is
    ``[`` is a JSON list; otherwise it is read as JSONL (blank lines are skipped; a one-line file
    holding a single object is a JSONL file with one record). Each record is validated with
    :func:`validate_record` (``input`` defaults to ``""``; extra fields are kept).

    Raises :class:`RecordError` for a missing/empty/non-UTF-8 file, malformed JSON (with line and
    column), malformed JSONL (with the line number), a top-level value that is not a list, a record
    that is not an object, or a missing/non-string field (with the record's index or line).
    """
    p = Path(path)
    text = _read_text(p)
    stripped = text.lstrip()
    if not stripped:
        raise RecordError(f"{p}: file is empty")

    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(p, "JSON", e) from None
        return [validate_record(r, f"{p}: record {i}") for i, r in enumerate(data)]

    if stripped[0] != "{":
        # Neither a list nor JSONL objects: say what it is when it is valid JSON.
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(
                f"{p}: neither a JSON list nor JSONL: line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
        raise RecordError(f"{p}: top-level JSON is {_type_name(value)}, expected a list of records")

    records: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            # A pretty-printed single object is valid JSON but not JSONL: name that precisely.
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                raise _json_error(p, "JSONL", e, line=lineno) from None
            raise RecordError(
                f"{p}: top-level JSON is {_type_name(whole)}, expected a list of records "
                "(or JSONL: one record per line)"
            ) from None
        records.append(validate_record(obj, f"{p}: line {lineno} (record {len(records)})"))
    return records


def normalise(record: dict) -> dict:
    """Return ``{"instruction", "input", "output"}`` normalised: newlines unified to ``\\n``,
    Unicode NFC, surrounding whitespace stripped. Validates the record first (:class:`RecordError`)."""
    return _normalise_fields(validate_record(record))


def _normalise_fields(rec: dict) -> dict:
    out = {}
    for field in TEXT_FIELDS:
        s = rec[field].replace("\r\n", "\n").replace("\r", "\n")
        out[field] = unicodedata.normalize("NFC", s).strip()
    return out


def canonical_json(normalised: dict) -> str:
    """The canonical JSON text that :func:`content_hash` hashes (the ledger stores exactly this)."""
    return json.dumps(normalised, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(record: dict) -> str:
    """sha256 hex digest of the canonical JSON of :func:`normalise` (record)."""
    return _hash_text(canonical_json(normalise(record)))


def _id_from(record: dict, chash: str) -> str:
    if "id" in record:
        return str(record["id"])
    return "h" + chash[:20]


def sample_id(record: dict) -> str:
    """The record's own ``id`` as a string if it has one, else ``"h" + content_hash(record)[:20]``."""
    rec = validate_record(record)
    if "id" in rec:
        return str(rec["id"])
    return _id_from(rec, content_hash(rec))


def identify(record: Any, where: str = "record") -> tuple[str, str, str]:
    """Validate ``record`` once and return ``(sample_id, content_hash, canonical_json)``.

    The fast path used by the ledger (one normalisation per record). ``where`` prefixes errors.
    """
    rec = validate_record(record, where)
    text = canonical_json(_normalise_fields(rec))
    chash = _hash_text(text)
    return _id_from(rec, chash), chash, text


def _id_value(value: Any, where: str) -> str:
    if isinstance(value, dict):
        if "id" not in value:
            raise RecordError(f"{where}: object has no 'id' field")
        value = value["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(f"{where}: id must be a string or an integer, got {_type_name(value)}")
    s = str(value)
    if not s.strip():
        raise RecordError(f"{where}: id is an empty string")
    return s


def _ids_from_file(p: Path) -> list[str]:
    text = _read_text(p)
    stripped = text.lstrip()
    if not stripped:
        return []
    first = stripped[0]
    if first == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(p, "JSON", e) from None
        return [_id_value(v, f"{p}: item {i}") for i, v in enumerate(data)]
    ids: list[str] = []
    json_lines = first in "{\""
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if json_lines:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise _json_error(p, "JSONL", e, line=lineno) from None
            ids.append(_id_value(value, f"{p}: line {lineno}"))
        else:
            ids.append(line)
    return ids


def load_sample_ids(path_or_list: str | os.PathLike | Iterable[Any]) -> list[str]:
    """Load a deletion list: the sample ids to forget, in the given order.

    ``path_or_list`` is a path (``str`` or ``PathLike``) or a Python iterable of ids (str, int, or
    ``{"id": ...}`` objects). A file is, by content: a JSON list (of ids or ``{"id": ...}``), JSONL
    (first non-blank character ``{`` or ``"``: one JSON string/int/``{"id": ...}`` per line), or plain
    text with one id per line (lines stripped, blank lines skipped).

    Raises :class:`RecordError` for an empty list (``"empty deletion list"``), duplicate ids (named),
    malformed JSON/JSONL (with the line number) or an item that is not an id.
    """
    if isinstance(path_or_list, (str, os.PathLike)):
        source = str(path_or_list)
        ids = _ids_from_file(Path(path_or_list))
    else:
        source = "deletion list"
        try:
            items = list(path_or_list)
        except TypeError:
            raise RecordError(
                f"deletion list must be a path or an iterable of ids, got {_type_name(path_or_list)}"
            ) from None
        ids = [_id_value(v, f"deletion list: item {i}") for i, v in enumerate(items)]
    if not ids:
        raise RecordError(f"empty deletion list ({source})")
    dups = [s for s, n in Counter(ids).items() if n > 1]
    if dups:
        shown = ", ".join(repr(s) for s in dups[:10])
        more = f" and {len(dups) - 10} more" if len(dups) > 10 else ""
        raise RecordError(f"{source}: duplicate ids in deletion list ({len(dups)}): {shown}{more}")
    return ids
