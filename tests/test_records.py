"""records.py: loading, validation, normalisation, ids, deletion lists."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from s3t_llm import paths
from s3t_llm.records import (
    RecordError,
    content_hash,
    identify,
    load_records,
    load_sample_ids,
    normalise,
    sample_id,
)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# -- normalisation and ids -------------------------------------------------------------------------


def test_normalise_strips_unifies_newlines_and_nfc():
    rec = {"instruction": "  Caf\u0065\u0301\r\nline two\r ", "output": "\tok\n\n"}
    assert normalise(rec) == {"instruction": "Caf\u00e9\nline two", "input": "", "output": "ok"}


def test_content_hash_is_sha256_of_canonical_json():
    rec = {"instruction": "Say \u00e9", "input": "x", "output": "y", "extra": 1}
    canonical = '{"input":"x","instruction":"Say \u00e9","output":"y"}'
    assert content_hash(rec) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    # extra fields are not hashed, the id field is not hashed either
    assert content_hash(rec) == content_hash({"instruction": "Say \u00e9", "input": "x", "output": "y", "id": 3})


def test_content_ids_stable_under_whitespace_and_newline_variants():
    base = {"instruction": "Give three tips.\nBe brief.", "input": "", "output": "1. Eat\n2. Sleep"}
    variants = [
        {"instruction": "Give three tips.\r\nBe brief.", "output": "1. Eat\r\n2. Sleep"},  # no input
        {"instruction": "  Give three tips.\rBe brief.\n", "input": "  ", "output": "1. Eat\n2. Sleep\n\n"},
        {"instruction": "Give three tips.\nBe brief.", "input": "", "output": "1. Eat\n2. Sleep", "note": "x"},
    ]
    sid = sample_id(base)
    assert sid.startswith("h") and len(sid) == 21
    int(sid[1:], 16)  # hex
    assert sid == "h" + content_hash(base)[:20]
    for v in variants:
        assert sample_id(v) == sid
        assert content_hash(v) == content_hash(base)
    # a real change of content changes the id; inner whitespace is content
    assert sample_id({**base, "output": "1. Eat\n2. Sleep!"}) != sid
    assert sample_id({**base, "output": "1.  Eat\n2. Sleep"}) != sid
    assert sample_id({**base, "input": "context"}) != sid


def test_dataset_id_field_wins():
    rec = {"id": 17, "instruction": "a", "output": "b"}
    assert sample_id(rec) == "17"
    assert sample_id({**rec, "id": "alpaca-17"}) == "alpaca-17"
    sid, chash, text = identify(rec)
    assert sid == "17"
    assert chash == content_hash({"instruction": "a", "output": "b"})
    assert json.loads(text) == {"instruction": "a", "input": "", "output": "b"}


@pytest.mark.parametrize(
    "rec, expected",
    [
        ([1, 2], "expected a JSON object, got list"),
        ({"output": "b"}, "field 'instruction' is missing"),
        ({"instruction": "a"}, "field 'output' is missing"),
        ({"instruction": 5, "output": "b"}, "field 'instruction' must be a string, got int"),
        ({"instruction": "a", "output": None}, "field 'output' must be a string, got null"),
        ({"instruction": "a", "input": ["x"], "output": "b"}, "field 'input' must be a string, got list"),
        ({"id": True, "instruction": "a", "output": "b"}, "field 'id' must be a string or an integer"),
        ({"id": " ", "instruction": "a", "output": "b"}, "field 'id' is an empty string"),
    ],
)
def test_bad_records_are_named(rec, expected):
    with pytest.raises(RecordError, match=expected):
        sample_id(rec)


# -- load_records ----------------------------------------------------------------------------------


def test_load_json_list_and_jsonl_by_content(tmp_path):
    recs = [
        {"instruction": "a", "input": "i", "output": "b"},
        {"instruction": "c", "output": "d", "id": 9, "extra": {"k": 1}},
    ]
    # JSON list in a .jsonl file and JSONL in a .json file: content decides
    p1 = write(tmp_path / "x.jsonl", json.dumps(recs, indent=2))
    p2 = write(tmp_path / "y.json", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    expected = [recs[0], {**recs[1], "input": ""}]  # input defaulted, extra fields kept
    assert load_records(p1) == expected
    assert load_records(p2) == expected
    # a one-line file with one object is a one-record JSONL file
    assert load_records(write(tmp_path / "one.json", json.dumps(recs[0]))) == [recs[0]]
    # a UTF-8 BOM is tolerated
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(recs).encode())
    assert len(load_records(tmp_path / "bom.json")) == 2


def test_malformed_json_names_line(tmp_path):
    p = write(tmp_path / "bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(RecordError, match=r"bad\.json: malformed JSON at line 3, column"):
        load_records(p)


def test_malformed_jsonl_names_line(tmp_path):
    lines = [json.dumps({"instruction": "a", "output": "b"})] * 3 + ['{"instruction": "a", "output": }']
    p = write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl: malformed JSONL at line 4"):
        load_records(p)


def test_jsonl_bad_record_names_line_and_field(tmp_path):
    lines = [json.dumps({"instruction": "a", "output": "b"}), "", json.dumps({"instruction": "a", "output": 3})]
    p = write(tmp_path / "f.jsonl", "\n".join(lines))
    with pytest.raises(RecordError, match=r"line 3 \(record 1\): field 'output' must be a string, got int"):
        load_records(p)
    p = write(tmp_path / "g.jsonl", json.dumps({"instruction": "a", "output": "b"}) + "\n[1]\n")
    with pytest.raises(RecordError, match=r"g\.jsonl: line 2 \(record 1\): expected a JSON object, got list"):
        load_records(p)


def test_json_list_missing_and_non_string_fields(tmp_path):
    p = write(tmp_path / "m.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    with pytest.raises(RecordError, match=r"m\.json: record 1: field 'output' is missing"):
        load_records(p)
    p = write(tmp_path / "n.json", json.dumps([{"instruction": "a", "input": 7, "output": "b"}]))
    with pytest.raises(RecordError, match=r"n\.json: record 0: field 'input' must be a string, got int"):
        load_records(p)
    p = write(tmp_path / "o.json", json.dumps([{"instruction": "a", "output": "b"}, "text"]))
    with pytest.raises(RecordError, match=r"record 1: expected a JSON object, got str"):
        load_records(p)


@pytest.mark.parametrize(
    "text, expected",
    [
        (json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2), "top-level JSON is dict, expected a list"),
        ("42", "top-level JSON is int, expected a list"),
        ('"just a string"', "top-level JSON is str"),
        ("hello world", "neither a JSON list nor JSONL: line 1"),
        ("   \n\n", "file is empty"),
    ],
)
def test_non_list_json(tmp_path, text, expected):
    with pytest.raises(RecordError, match=expected):
        load_records(write(tmp_path / "t.json", text))


def test_missing_and_non_utf8_file(tmp_path):
    with pytest.raises(RecordError, match="no such file"):
        load_records(tmp_path / "nope.json")
    (tmp_path / "latin.json").write_bytes(b'[{"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(RecordError, match="not UTF-8"):
        load_records(tmp_path / "latin.json")


# -- deletion lists --------------------------------------------------------------------------------


def test_load_sample_ids_all_formats(tmp_path):
    want = ["a1", "17", "h0123"]
    assert load_sample_ids(write(tmp_path / "l.json", '["a1", 17, {"id": "h0123"}]')) == want
    assert load_sample_ids(write(tmp_path / "l.jsonl", '"a1"\n17\n\n{"id": "h0123"}\n')) == want
    assert load_sample_ids(write(tmp_path / "o.jsonl", '{"id": "a1"}\n{"id": 17}\n{"id": "h0123", "why": "gdpr"}\n')) == want
    assert load_sample_ids(write(tmp_path / "l.txt", "a1\n  17 \n\nh0123\n")) == want
    assert load_sample_ids(str(tmp_path / "l.txt")) == want
    assert load_sample_ids(["a1", 17, {"id": "h0123"}]) == want
    assert load_sample_ids(("x",)) == ["x"]


def test_load_sample_ids_errors(tmp_path):
    with pytest.raises(RecordError, match="empty deletion list"):
        load_sample_ids([])
    with pytest.raises(RecordError, match="empty deletion list"):
        load_sample_ids(write(tmp_path / "e.txt", "\n \n"))
    with pytest.raises(RecordError, match="empty deletion list"):
        load_sample_ids(write(tmp_path / "e.json", "[]"))
    with pytest.raises(RecordError, match=r"duplicate ids in deletion list \(2\): 'a', 'b'"):
        load_sample_ids(["a", "b", "c", "a", "b", "a"])
    with pytest.raises(RecordError, match=r"duplicate ids .*'x'"):
        load_sample_ids(write(tmp_path / "d.txt", "x\ny\nx\n"))
    with pytest.raises(RecordError, match=r"malformed JSON at line 2"):
        load_sample_ids(write(tmp_path / "b.json", '["a",\n "b" "c"]'))
    with pytest.raises(RecordError, match=r"malformed JSONL at line 3"):
        load_sample_ids(write(tmp_path / "b.jsonl", '"a"\n"b"\n"c\n'))
    with pytest.raises(RecordError, match=r"line 2: object has no 'id' field"):
        load_sample_ids(write(tmp_path / "n.jsonl", '{"id": "a"}\n{"name": "b"}\n'))
    with pytest.raises(RecordError, match=r"item 1: id must be a string or an integer, got float"):
        load_sample_ids(["a", 1.5])
    with pytest.raises(RecordError, match=r"item 0: id must be a string or an integer, got bool"):
        load_sample_ids([True])
    with pytest.raises(RecordError, match="no such file"):
        load_sample_ids(tmp_path / "missing.txt")


# -- the real file ---------------------------------------------------------------------------------


@pytest.mark.skipif(not paths.alpaca_path().exists(), reason=f"Alpaca file not found at {paths.alpaca_path()}")
def test_real_alpaca_loads():
    t0 = time.perf_counter()
    recs = load_records(paths.alpaca_path())
    ids = [identify(r)[0] for r in recs]
    dt = time.perf_counter() - t0
    print(f"loaded and identified {len(recs)} Alpaca records in {dt:.2f} s")
    assert len(recs) == 52002
    assert all(set(r) == {"instruction", "input", "output"} for r in recs)
    assert recs[0]["instruction"] == "Give three tips for staying healthy."
    assert all(i.startswith("h") and len(i) == 21 for i in ids)
    assert dt < 20
