"""``!function`` helpers of the s3t lm-eval task YAMLs (``eval/lm_tasks``).

Loaders (``custom_dataset: !function utils.local_json`` etc.) read the local benchmark files named by the
task's ``dataset_kwargs: {data_files: ...}`` with ``datasets.load_dataset("json" | "csv" | "text", ...)``,
the relative paths resolved against the shared data folder (``s3t_llm.paths.shared_data_dir()``, i.e. env
``S3T_SHARED_DATA``, else ``../shared/data`` beside the checkout). The same YAMLs therefore work with
``s3t eval --tasks s3t_arc_easy`` and with lm-eval's own CLI (``lm_eval --include_path eval/lm_tasks ...``).

``process_docs`` helpers turn the local layouts into the hub layouts lm-eval's own task definitions expect,
so that the rest of each YAML (``doc_to_text``, ``doc_to_choice``, ``doc_to_target``) is lm-eval's, verbatim.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import datasets


# ------------------------------------------------------------------------------------------------ data files

def shared_data_dir() -> Path:
    try:
        from s3t_llm.paths import shared_data_dir as _sdd
    except ImportError:  # lm-eval run outside the s3t_llm environment: same rule as s3t_llm.paths
        env = os.environ.get("S3T_SHARED_DATA")
        return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(_sdd())


def _resolve(files):
    """``data_files`` (a path, a list of paths or ``{split: path(s)}``) with relative paths made absolute."""
    if isinstance(files, dict):
        return {k: _resolve(v) for k, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_resolve(f) for f in files]
    p = Path(os.path.expanduser(str(files)))
    full = p if p.is_absolute() else shared_data_dir() / p
    if not any(ch in str(p) for ch in "*?[") and not full.is_file():
        raise FileNotFoundError(f"benchmark file {full} not found (relative paths are resolved against the "
                                f"shared data folder {shared_data_dir()}; set S3T_SHARED_DATA)")
    return str(full)


def local_json(data_files=None, **_metadata) -> datasets.DatasetDict:
    """``datasets.load_dataset("json", data_files=...)`` with paths under the shared data folder."""
    return datasets.load_dataset("json", data_files=_resolve(data_files))


def local_csv(data_files=None, **_metadata) -> datasets.DatasetDict:
    """CSV read as strings (``dtype=str``, no NA guessing), like ``csv.DictReader``: an answer text ``"None"``
    or ``"4"`` stays the string it is in the file."""
    files = _resolve(data_files)
    first = next(iter(files.values())) if isinstance(files, dict) else files
    first = first[0] if isinstance(first, list) else first
    with open(first, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh))
    features = datasets.Features({c: datasets.Value("string") for c in header})
    return datasets.load_dataset("csv", data_files=files, features=features, keep_default_na=False,
                                 na_filter=False)


def local_text(data_files=None, **_metadata) -> datasets.DatasetDict:
    """One row per line (``text`` field)."""
    return datasets.load_dataset("text", data_files=_resolve(data_files))


def local_json_with_labels(data_files=None, labels_files=None, **_metadata) -> datasets.DatasetDict:
    """JSONL records plus an aligned labels file (one label per line) stored as the ``label`` field (PIQA)."""
    ds = local_json(data_files)
    labels_files = _resolve(labels_files or {})
    for split, path in labels_files.items():
        labels = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(labels) != len(ds[split]):
            raise ValueError(f"labels file {path} has {len(labels)} labels for {len(ds[split])} records")
        ds[split] = ds[split].add_column("label", [int(x) for x in labels])
    return ds


# ------------------------------------------------------------------------------------------------ layouts

def _choice_lists(choices):
    """The AI2 layout's ``[{"text","label"}, ...]`` (or an already columnar ``{"text": [...], "label": [...]}``)."""
    if isinstance(choices, dict):
        return {"text": list(choices["text"]), "label": list(choices["label"])}
    return {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}


def ai2_to_hub(dataset: datasets.Dataset) -> datasets.Dataset:
    """AI2 ARC original JSONL (``question: {stem, choices: [{text, label}]}``) -> ``allenai/ai2_arc`` layout
    (``question`` string, ``choices: {text: [...], label: [...]}``, ``answerKey``)."""
    def f(doc):
        return {"id": doc["id"], "question": doc["question"]["stem"],
                "choices": _choice_lists(doc["question"]["choices"]), "answerKey": doc["answerKey"]}

    return dataset.map(f, remove_columns=dataset.column_names)


def obqa_to_hub(dataset: datasets.Dataset) -> datasets.Dataset:
    """OpenBookQA original JSONL -> ``allenai/openbookqa`` (main) layout (``question_stem``, ``choices``, ``answerKey``)."""
    def f(doc):
        return {"id": doc["id"], "question_stem": doc["question"]["stem"],
                "choices": _choice_lists(doc["question"]["choices"]), "answerKey": doc["answerKey"]}

    return dataset.map(f, remove_columns=dataset.column_names)


def boolq_to_hub(dataset: datasets.Dataset) -> datasets.Dataset:
    """BoolQ JSONL whose ``label`` is a JSON boolean or the string "true"/"false" -> ``aps/super_glue`` boolq
    layout (``label`` 0 = False, 1 = True)."""
    def f(doc):
        lab = doc["label"]
        if isinstance(lab, str):
            low = lab.strip().lower()
            if low not in ("true", "false", "0", "1"):
                raise ValueError(f"BoolQ label {lab!r} is not true/false")
            lab = low in ("true", "1")
        return {"question": doc["question"], "passage": doc["passage"], "idx": doc.get("idx"), "label": int(bool(lab))}

    return dataset.map(f, remove_columns=dataset.column_names)


def mmlu_to_hub(dataset: datasets.Dataset) -> datasets.Dataset:
    """The reformatted MMLU CSV (``question,choice0..choice3,answer`` with a 0-based answer) -> ``cais/mmlu``
    layout (``question``, ``choices`` list of 4, ``answer`` int)."""
    def f(doc):
        return {"question": doc["question"], "choices": [doc[f"choice{i}"] for i in range(4)],
                "answer": int(doc["answer"])}

    return dataset.map(f, remove_columns=dataset.column_names)


def winogrande_gauntlet(dataset: datasets.Dataset) -> datasets.Dataset:
    """MosaicML gauntlet WinoGrande (``context_options``, ``continuation``, ``gold``): kept as is (the option-filled
    prefixes are lm-eval's ``doc_to_choice``, the continuation its ``doc_to_target``); ``gold`` made an int."""
    return dataset.map(lambda doc: {"gold": int(doc["gold"])})


# HellaSwag: lm-eval's preprocess (tasks/hellaswag/utils.py), verbatim.
def preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


_SENT_END = re.compile(r"[.!?]\s+(?=\S)")


def _capitalize_last_fragment(ctx: str) -> str:
    """lm-eval builds ``ctx_a + " " + ctx_b.capitalize()``; the llama.cpp text file holds ``ctx_a + " " + ctx_b``
    joined. ``ctx_b`` is (nearly always) the lowercase fragment after the last sentence end: capitalise that."""
    ends = list(_SENT_END.finditer(ctx))
    start = ends[-1].end() if ends else 0
    frag = ctx[start:]
    if frag[:1].islower():
        return ctx[:start] + frag.capitalize()
    return ctx


def hellaswag_txt_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """The llama.cpp 6-line HellaSwag text (``activity_label: ctx`` / gold / 4 endings), read by the ``text``
    builder one line a row, -> the docs lm-eval's ``process_docs`` makes (``query``, ``choices``, ``label``)."""
    lines = dataset["text"]
    while lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        raise ValueError(f"HellaSwag text: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    rows = {"activity_label": [], "ctx": [], "query": [], "choices": [], "label": [], "gold": []}
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i:i + 6]
        if not label.strip().isdigit():
            raise ValueError(f"HellaSwag text: line {i + 2} should be the gold ending index, got {label!r}")
        activity, _, ctx = head.partition(": ")
        rows["activity_label"].append(activity)
        rows["ctx"].append(ctx)
        rows["query"].append(preprocess(_capitalize_last_fragment(head)))
        rows["choices"].append([preprocess(e) for e in endings])
        rows["label"].append(str(int(label)))
        rows["gold"].append(int(label))
    return datasets.Dataset.from_dict(rows)
