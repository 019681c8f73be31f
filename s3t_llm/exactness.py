"""The exactness rule, in one place: which artifacts may be used, and what must be served, given the ledger.

Pure functions over plain data (no torch, no I/O), so that training, deletion, serving, recovery and
``s3t verify`` all decide the same way, and the rule can be property-tested exhaustively.

Inputs
------
``hashes``   ``{(shard, slice): content hash of the slice's LIVE samples}`` (the ledger's ``slices`` table).
``blocks``   ``{(shard, prefix): block manifest}``; a manifest carries ``sha256`` (its tensor file),
             ``slice_hashes`` (``{str(slice): hash}`` of every slice it was trained on) and, for depth > 1,
             ``parent_sha256`` (the digest of the block it was trained on top of).
``adapters`` ``{name: prefix-adapter manifest}``: ``shard``, ``prefix``, ``blocks`` = ``[{"prefix", "sha256"}]``.
``derived``  ``{name: manifest}`` of artifacts derived from a served adapter (approximate unlearning):
             ``shard`` and ``source_blocks`` = ``[{"prefix", "sha256"}]``.

The rule
--------
1. A block ``(s, p)`` is **valid** iff its manifest's slice set is exactly ``p``, every one of those slice
   hashes equals the ledger's current hash, and (depth > 1) its parent ``(s, p[:-1])`` is valid and has the
   digest recorded in ``parent_sha256``. (So a child trained over an older, since-retrained parent is not
   valid, and a child whose parent is gone is not valid.)
2. A sequence's **surviving prefix** is the longest ``k`` such that blocks ``seq[:1] .. seq[:k]`` are valid.
3. A shard serves the sequence with the longest surviving prefix (ties: the lowest sequence index); a shard
   whose best prefix is 0 is dead (serves nothing fine-tuned).
4. A prefix adapter or derived artifact is **current** iff each block it was built from is valid and has
   the digest it recorded. Anything not valid/current is **stale** and must not be used, served or kept.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

Prefix = tuple[int, ...]
BlockKey = tuple[int, Prefix]


def valid_blocks(blocks: Mapping[BlockKey, dict], hashes: Mapping[tuple[int, int], str]) -> set[BlockKey]:
    """The set of valid block keys (rule 1)."""
    memo: dict[BlockKey, bool] = {}

    def ok(key: BlockKey) -> bool:
        if key in memo:
            return memo[key]
        shard, prefix = key
        man = blocks.get(key)
        res = False
        if man is not None and prefix:
            sh = man.get("slice_hashes") or {}
            res = (sorted(int(x) for x in sh) == sorted(prefix) and len(set(prefix)) == len(prefix)
                   and all(hashes.get((shard, int(sl))) == h for sl, h in sh.items()))
            if res and len(prefix) > 1:
                parent = (shard, prefix[:-1])
                res = ok(parent) and man.get("parent_sha256") == blocks[parent].get("sha256")
        memo[key] = res
        return res

    return {k for k in blocks if ok(k)}


def surviving_prefix(shard: int, seq: Iterable[int], valid: set[BlockKey]) -> int:
    """Rule 2: the number of leading blocks of ``seq`` that are valid."""
    seq = tuple(seq)
    k = 0
    while k < len(seq) and (shard, seq[:k + 1]) in valid:
        k += 1
    return k


def best_sequence(lengths: list[int]) -> tuple[int, int]:
    """Rule 3: (index, length) of the longest surviving prefix; ties go to the lowest index."""
    if not lengths:
        raise ValueError("a shard needs at least one sequence")
    best = max(range(len(lengths)), key=lambda i: (lengths[i], -i))
    return best, lengths[best]


def chain_digest(block_shas: Iterable[str]) -> str:
    """Digest of a stack of blocks (their tensor digests in order): part of every adapter name, so that
    different weights never share a name (vLLM keys its prefix cache by name)."""
    return hashlib.sha256("".join(block_shas).encode()).hexdigest()[:10]


def adapter_name(run_name: str, shard: int, prefix: Prefix, block_shas: list[str]) -> str:
    return f"{run_name}-s{shard}-p{'-'.join(map(str, prefix))}-{chain_digest(block_shas)}"


def desired_routing(run_name: str, n_shards: int, sequences: list[list[int]], blocks: Mapping[BlockKey, dict],
                    hashes: Mapping[tuple[int, int], str]) -> dict[int, dict | None]:
    """For each shard: the adapter that must be served (rule 3), or None for a dead shard."""
    valid = valid_blocks(blocks, hashes)
    out: dict[int, dict | None] = {}
    for shard in range(n_shards):
        lens = [surviving_prefix(shard, seq, valid) for seq in sequences]
        qi, depth = best_sequence(lens)
        if depth == 0:
            out[shard] = None
            continue
        prefix = tuple(sequences[qi][:depth])
        shas = [blocks[(shard, prefix[:k])]["sha256"] for k in range(1, depth + 1)]
        out[shard] = {"name": adapter_name(run_name, shard, prefix, shas), "shard": shard, "sequence": qi,
                      "prefix": list(prefix), "depth": depth, "sequence_prefixes": lens, "block_sha256": shas}
    return out


def chain_current(shard: int, chain: list[dict], blocks: Mapping[BlockKey, dict], valid: set[BlockKey]) -> bool:
    """Rule 4 for one artifact built from ``chain`` = ``[{"prefix", "sha256"}, ...]`` of ``shard``."""
    if not chain:
        return False
    for b in chain:
        key = (int(shard), tuple(int(x) for x in b["prefix"]))
        if key not in valid or blocks[key].get("sha256") != b.get("sha256"):
            return False
    return True


def stale(blocks: Mapping[BlockKey, dict], hashes: Mapping[tuple[int, int], str], adapters: Mapping[str, dict],
          derived: Mapping[str, dict] | None = None) -> dict[str, list]:
    """Every stored artifact that must not be used any more: ``{"blocks": [keys], "adapters": [names],
    "derived": [names]}`` (rules 1 and 4)."""
    valid = valid_blocks(blocks, hashes)
    out = {"blocks": sorted(k for k in blocks if k not in valid), "adapters": [], "derived": []}
    for name, man in sorted(adapters.items()):
        if man.get("shard") is None or not chain_current(man["shard"], man.get("blocks") or [], blocks, valid):
            out["adapters"].append(name)
    for name, man in sorted((derived or {}).items()):
        if man.get("shard") is None or not chain_current(man["shard"], man.get("source_blocks") or [], blocks, valid):
            out["derived"].append(name)
    return out


def trained_sample_ids(shard: int, prefix: Iterable[int], blocks: Mapping[BlockKey, dict]) -> set[str]:
    """The sample ids that the blocks of ``prefix`` were trained on (from their manifests)."""
    prefix = tuple(prefix)
    ids: set[str] = set()
    for k in range(1, len(prefix) + 1):
        ids.update(blocks[(shard, prefix[:k])].get("sample_ids") or [])
    return ids
