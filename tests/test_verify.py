"""Erasure and the auditor's check on a really trained run: canaries (ASCII and non-ASCII) deleted from training
and held-out data are in no byte of the run directory, in any form; `s3t verify --replay` retrains a served prefix
bit for bit; tampering is found; `s3t train` refuses while a server holds the run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")

from s3t_llm.deletion import apply_deletion, publish  # noqa: E402
from s3t_llm.locking import acquire  # noqa: E402
from s3t_llm.run import DATASET, HELDOUT, Run  # noqa: E402
from s3t_llm.training import train_run  # noqa: E402
from tests.test_training import make_cfg  # noqa: E402

CANARIES = {"c-ascii": "zebra-quokka-canary-7741 recites the lighthouse code",
            "c-uni": "Ünïcødé çanary — 北京 «ЖЖЖ» ✓ 9931",
            "c-held": "held-out canary marmalade-3307 ünique"}


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory, tiny_llama, alpaca_sample):
    d = tmp_path_factory.mktemp("verify")
    recs = [dict(r) for r in alpaca_sample[:40]]
    recs[3] = {"id": "c-ascii", "instruction": "Repeat the secret.", "input": CANARIES["c-ascii"],
               "output": f"The secret is: {CANARIES['c-ascii']}"}
    recs[7] = {"id": "c-uni", "instruction": f"Say {CANARIES['c-uni']}", "input": "",
               "output": CANARIES["c-uni"]}
    recs[11] = {"id": "c-held", "instruction": "Describe it.", "input": "", "output": CANARIES["c-held"]}
    data = d / "source.json"
    data.write_text(json.dumps(recs, ensure_ascii=False))
    cfg = make_cfg(d, tiny_llama, data, name="audit",
                   extra=["s3t.shards=2", "s3t.slices=2", "s3t.budget=2", "data.heldout=8"])
    run = Run.create(cfg)
    train_run(run, progress=False)
    publish(run)
    return run, data, cfg


def forms(text: str, tok) -> list[tuple[str, bytes]]:
    ids = tok(text, add_special_tokens=False)["input_ids"][1:-1]
    return [("utf-8", text.encode()), ("json", json.dumps(text)[1:-1].encode()),
            ("json-utf8", json.dumps(text, ensure_ascii=False)[1:-1].encode()),
            ("token ids text", ", ".join(map(str, ids)).encode()), ("token ids csv", ",".join(map(str, ids)).encode()),
            ("int32", np.asarray(ids, "<i4").tobytes()), ("int64", np.asarray(ids, "<i8").tobytes())]


def grep(run_dir, needles):
    hits = []
    for p in sorted(run_dir.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            hits += [(p.name, what) for what, n in needles if n in data]
    return hits


def test_deleted_canaries_are_in_no_byte_of_the_run_directory(canary_run, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    src, data, _ = canary_run
    run = Run.open(shutil.copytree(src.dir, tmp_path / "r"))
    tok = AutoTokenizer.from_pretrained(run.model_path)
    held = run.heldout()[0]  # a held-out record is deletable and erased like a training sample
    texts = dict(CANARIES, **{held["id"]: held["output"]})
    with run.ledger() as led:
        assert not led.is_deleted(DATASET, "c-ascii") and not led.is_deleted(HELDOUT, held["id"])
    needles = [(f"{k} {w}", b) for k, t in texts.items() for w, b in forms(t, tok)]
    # positive control: before the deletion the ledger holds every canary (so the search can find them)
    assert {w.split()[0] for f, w in grep(run.dir, needles) if f.startswith("ledger")} == set(texts)
    victims = sorted(set(CANARIES) | {held["id"]})
    cert = apply_deletion(run, victims, request_id="erase-1")
    assert sorted(cert["newly_deleted"]) == victims
    files = sorted(p.name for p in run.dir.rglob("*") if p.is_file())
    assert "ledger.sqlite" in files
    assert grep(run.dir, needles) == []
    assert cert["erasure"]["ledger"]["vacuum"] and cert["erasure"]["ledger"]["wal_truncated"]
    # the tombstones still confirm the records to the key holder, and verify with the source passes
    with run.ledger() as led:
        rec = next(r for r in json.loads(data.read_text()) if r["id"] == "c-uni")
        assert led.tombstone_matches(DATASET, "c-uni", rec)
        assert not led.tombstone_matches(DATASET, "c-uni", dict(rec, output="something else"))
    p = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "verify", str(run.dir), "--source", str(data)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "PASS" in p.stdout, p.stdout + p.stderr
    assert f"{len(victims)} deleted record(s) recovered" in p.stdout
    # planting one canary back anywhere is found by the auditor
    (run.dir / "notes.txt").write_text("kept: " + CANARIES["c-uni"])
    p = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "verify", str(run.dir), "--source", str(data)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "notes.txt" in p.stdout


def test_verify_replay_reproduces_the_served_prefix_bit_for_bit_and_finds_tampering(canary_run, tmp_path):
    import shutil

    src, data, _ = canary_run
    run = Run.open(shutil.copytree(src.dir, tmp_path / "r"))
    with run.ledger() as led:
        victim = led.slice_samples(DATASET, 0, run.sequences[0][1])[0][0]
    apply_deletion(run, [victim])
    p = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "verify", str(run.dir), "--replay",
                        "--output", str(tmp_path / "report.json")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and "PASS" in p.stdout and "bit for bit" in p.stdout, p.stdout + p.stderr
    assert json.loads((tmp_path / "report.json").read_text())["problems"] == []
    # flip one byte of a served block: the digest check fails, and so does replay
    s, prefix = sorted(run.store.blocks())[0]
    f = run.store.block_dir(s, prefix) / "adapter_block.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    p = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "verify", str(run.dir)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 1 and "corrupt" in p.stdout


def test_train_refuses_while_a_server_holds_the_run(canary_run, tmp_path):
    src, _, cfg = canary_run
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    lock = acquire(src.dir, "serve", url="http://127.0.0.1:9")
    try:
        before = sorted(p.name for p in src.dir.rglob("*"))
        p = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "train", str(recipe)], capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 2 and "served by `s3t serve`" in p.stderr, p.stderr[-2000:]
        assert sorted(p.name for p in src.dir.rglob("*")) == before
    finally:
        lock.release()
