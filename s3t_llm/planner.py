"""Slice orderings ("sequences") for S3T shards.

A shard's data is split into ``L`` disjoint slices, numbered ``0 .. L-1``. A *sequence* is a
permutation of the slices: stage ``k`` of the model trained on sequence ``pi`` has seen slices
``pi[0] .. pi[k-1]``. When a deletion hits slice ``j``, every stage that saw ``j`` must be dropped,
so the sequence is truncated to the prefix before ``j``'s position. Each shard trains ``B``
sequences (the *budget*); a shard is dead once every sequence is truncated to length 0, i.e. once
the first slice of every sequence has been hit.

Three ways of choosing the ``B`` sequences are provided (Chowdhury et al., ICLR 2025, section 3.3):

``cyclic``  Algorithm 1, iterative cyclic rotation. Rows of the cyclic Latin square first, then
            rotations of the suffix after position 1, 2, ... until ``B`` distinct sequences exist.
``bms``     Algorithm 2, bipartite-matching selection for a non-uniform deletion prior: every slice
            starts one sequence and the later positions are filled by Hungarian matchings that
            maximise the score ``sum_i i * (1 - sum_{l<=i} p_{pi_l})**t``.
``random``  ``B`` distinct uniformly random permutations (a baseline).

Sequences are tuples of ints. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import math
from numbers import Integral, Real
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "PlanError",
    "METHODS",
    "DEFAULT_T",
    "cyclic_sequences",
    "bms_sequences",
    "random_sequences",
    "sequence_score",
    "plan_sequences",
    "check_sequences",
    "validate_prior",
    "surviving_prefix",
    "best_prefix",
]

METHODS = ("cyclic", "bms", "random")

#: Default exponent ``t`` of the BMS score, as in the authors' ``get_score``. With ``t = 1`` the
#: objective is degenerate: every Latin square of sequences has the same total score
#: ``sum_i i * (L - i)``, so the matchings at ``B = L`` would be arbitrary ties.
DEFAULT_T = 100.0


class PlanError(ValueError):
    """A sequence plan was asked for with invalid parameters."""


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _pos_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise PlanError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise PlanError(f"{name} must be a positive int, got {name}={value}")
    return int(value)


def _factorial_at_least(L: int, B: int) -> bool:
    """``L! >= B`` without computing a huge factorial."""
    prod = 1
    for k in range(2, L + 1):
        prod *= k
        if prod >= B:
            return True
    return prod >= B


def _check_budget(L: int, B: int) -> None:
    if not _factorial_at_least(L, B):
        raise PlanError(f"B={B} exceeds L!={math.factorial(L)} distinct sequences (L={L})")


def _check_t(t: object) -> float:
    if isinstance(t, bool) or not isinstance(t, Real) or not math.isfinite(float(t)) or t <= 0:
        raise PlanError(f"t must be a finite positive number, got t={t!r}")
    return float(t)


def validate_prior(prior: Sequence[float], L: int | None = None) -> np.ndarray:
    """Return ``prior`` as a float array after checking it is a distribution over ``L`` slices.

    Raises :class:`PlanError` if it is empty, has the wrong length, contains negative or
    non-finite entries, or does not sum to 1 within 1e-6.
    """
    if prior is None:
        raise PlanError("prior must be a sequence of slice probabilities, got prior=None")
    try:
        p = np.asarray(prior, dtype=float)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"prior must be a sequence of numbers, got prior={prior!r}") from exc
    if p.ndim != 1 or p.size == 0:
        raise PlanError(f"prior must be a non-empty 1-D sequence, got shape {p.shape}")
    if L is not None and p.size != L:
        raise PlanError(f"prior has length {p.size} but L={L}")
    if not np.all(np.isfinite(p)):
        raise PlanError(f"prior must be finite, got prior={p.tolist()}")
    if np.any(p < 0):
        raise PlanError(f"prior must be non-negative, got prior={p.tolist()}")
    total = float(p.sum())
    if abs(total - 1.0) > 1e-6:
        raise PlanError(f"prior must sum to 1 (within 1e-6), got sum(prior)={total!r}")
    return p


def check_sequences(seqs: Iterable[Sequence[int]], L: int) -> list[tuple[int, ...]]:
    """Check that ``seqs`` is a non-empty list of distinct permutations of ``range(L)``."""
    L = _pos_int("L", L)
    out = [tuple(int(x) for x in s) for s in seqs]
    if not out:
        raise PlanError("sequences must be non-empty")
    full = set(range(L))
    for i, s in enumerate(out):
        if len(s) != L or set(s) != full:
            raise PlanError(f"sequence {i}={s} is not a permutation of range(L={L})")
    if len(set(out)) != len(out):
        raise PlanError("sequences must be distinct")
    return out


def _rotate_left(seq: tuple[int, ...], k: int) -> tuple[int, ...]:
    if not seq:
        return seq
    k %= len(seq)
    return seq[k:] + seq[:k]


# --------------------------------------------------------------------------------------------
# Algorithm 1: iterative cyclic rotation
# --------------------------------------------------------------------------------------------


def cyclic_sequences(L: int, B: int) -> list[tuple[int, ...]]:
    """Algorithm 1 (iterative cyclic rotation): ``B`` distinct slice orderings of ``L`` slices.

    * ``B <= L``: ``B`` rows of the cyclic Latin square, row ``r = (r, r+1, ..., r+L-1) mod L``.
      The rows taken are ``r_j = floor(j * L / B)`` for ``j = 0 .. B-1``: their first slices (and
      hence every position) are spread evenly round the cycle, so short prefixes of different
      sequences overlap as little as possible (e.g. L=4, B=2 gives rows 0 and 2, whose 2-prefixes
      {0,1} and {2,3} are disjoint). Row 0 is always included, so ``B=1`` is SISA's order
      ``(0, 1, ..., L-1)``; at ``B = L`` the result is exactly the full cyclic Latin square
      (each slice once per row and once per column).
    * ``B > L``: the construction continues one position deeper at a time. Depth 1 rotates the
      suffix after the first position of every Latin-square row (``L - 1`` rotations each,
      ``L*(L-1)`` sequences with distinct 2-prefixes); depth 2 rotates the suffix after the second
      position of all of those, and so on. The smallest depth ``d`` whose full level holds at
      least ``B`` sequences is used: every sequence of the previous (complete) level is kept and
      gets ``floor(B/N)`` or ``ceil(B/N)`` suffix rotations (``N`` = size of that level, the extra
      ones spread evenly over the parents, rotation offsets spread evenly over the suffix).
      Sequences at depth ``d`` have distinct ``d+1``-prefixes, so all ``B`` are distinct for any
      ``B <= L!`` (at ``B = L!`` all permutations are returned).

    This follows the idea of the authors' ``get_cyclic`` (sequence_selection.py), which rotates
    left instead of right, and fails when ``B`` needs more than one extra depth; here every
    ``B <= L!`` works.
    """
    L = _pos_int("L", L)
    B = _pos_int("B", B)
    _check_budget(L, B)
    base = tuple(range(L))
    if B <= L:
        return [_rotate_left(base, (j * L) // B) for j in range(B)]

    level = [_rotate_left(base, r) for r in range(L)]  # depth 0: distinct 1-prefixes
    d = 1
    while B > len(level) * (L - d):
        s = L - d
        level = [p[:d] + _rotate_left(p[d:], r) for p in level for r in range(s)]
        d += 1
    s = L - d  # >= 2 here because B <= L!
    n_parents = len(level)
    per, rem = divmod(B, n_parents)
    extra = {(i * n_parents) // rem for i in range(rem)} if rem else set()
    out: list[tuple[int, ...]] = []
    for q, p in enumerate(level):
        c = per + (1 if q in extra else 0)
        for i in range(c):
            out.append(p[:d] + _rotate_left(p[d:], (i * s) // c))
    return out


# --------------------------------------------------------------------------------------------
# Algorithm 2: bipartite-matching selection (BMS)
# --------------------------------------------------------------------------------------------


def _gain(position: int, cum: np.ndarray | float, t: float) -> np.ndarray | float:
    """Score contribution of 1-based ``position`` given cumulative prior ``cum`` up to it."""
    return position * np.clip(1.0 - np.asarray(cum, dtype=float), 0.0, None) ** t


def _scaled_gains(cum: np.ndarray, allowed: np.ndarray, t: float) -> np.ndarray:
    """``(1 - cum)**t`` divided by its largest allowed value, computed in log space.

    Within one position the factor ``i`` and this rescaling are common to all edges, so the
    matching is unchanged; the rescaling keeps the weights in ``[0, 1]`` even for large ``t``,
    where ``(1 - cum)**t`` is tiny, so they stay comparable with the ``-(L+1)`` penalty on
    forbidden edges (which any matching of allowed edges beats).
    """
    with np.errstate(divide="ignore"):
        logs = t * np.log(np.clip(1.0 - cum, 0.0, None))
    logs = np.where(allowed, logs, -np.inf)
    top = np.max(logs)
    if not np.isfinite(top):  # every allowed edge has zero gain
        return np.zeros_like(cum)
    return np.exp(logs - top)


def _single_score(seq: Sequence[int], p: np.ndarray, t: float) -> float:
    cum = np.cumsum(p[list(seq)])
    pos = np.arange(1, len(seq) + 1)
    return float(np.sum(_gain(pos, cum, t)))


def bms_sequences(
    prior: Sequence[float], B: int, t: float = DEFAULT_T, seed: int = 0
) -> list[tuple[int, ...]]:
    """Algorithm 2 (bipartite-matching selection) for a deletion prior over slices.

    ``prior[l]`` is the probability that a deletion hits slice ``l``; ``L = len(prior)``.

    One *round* builds ``L`` sequences: sequence ``l`` starts with slice ``l``; then for each
    position ``i = 2 .. L`` a maximum-weight bipartite matching (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``) between the ``L`` sequences and the slices assigns
    every sequence one slice it has not used yet, all different, with weight
    ``i * (1 - (c + p_j))**t`` where ``c`` is the sequence's cumulative prior so far. Maximising
    the sum of these increments is the same as maximising the sum of the full-prefix scores used
    by the authors' ``bms_selection``; the total over a round is ``sequence_score``. Every round
    is a Latin square: at each position each slice is used by exactly one sequence.

    * ``B < L``: one round in which only the ``B`` sequences starting with the least likely
      slices are kept (ties: lower slice index). The other ``L - B`` rows stay in the matching
      as zero-weight placeholders, so the kept rows still form a completable Latin rectangle
      (the matchings are always feasible) while the objective counts only the kept rows. At
      ``B = 1`` this gives the slices in increasing order of prior, the best single sequence.
    * ``B = L``: one full round (what the paper and the authors' ``bms_selection`` do).
    * ``L < B <= L*(L-1)``: further rounds. In round ``r`` the position-2 matching may not reuse a
      (first, second) pair from an earlier round, so all sequences have distinct 2-prefixes and
      are distinct; the allowed graph at that position stays ``(L-1-r)``-regular, so the matching
      always exists for ``r <= L-2``. The last round may be partial (kept rows chosen as above).
    * ``B > L*(L-1)`` (possible only for ``L >= 4``): :class:`PlanError`; use ``cyclic``.

    Output is round-major, each round in order of first slice.

    ``t`` sharpens the penalty on cumulative deletion mass; the default :data:`DEFAULT_T` is the
    authors' ``t=100``. ``t=1`` is degenerate at ``B=L`` (all Latin squares score the same) and
    only decides which slices the kept rows get when ``B<L``; any ``t>1`` prefers to give the
    least likely remaining slice to the sequence that is already safest.

    ``seed`` is accepted for signature uniformity with the other planners; the algorithm is
    deterministic and ignores it.
    """
    from scipy.optimize import linear_sum_assignment

    p = validate_prior(prior)
    L = int(p.size)
    B = _pos_int("B", B)
    t = _check_t(t)
    _check_budget(L, B)
    cap = L * (L - 1) if L > 1 else 1
    if B > cap:
        raise PlanError(
            f"B={B} exceeds L*(L-1)={cap} sequences that bms_sequences supports for L={L}; "
            "use method='cyclic' for larger budgets"
        )
    del seed  # deterministic

    rounds = -(-B // L)
    by_likelihood = sorted(range(L), key=lambda l: (p[l], l))  # least likely first
    used_second: list[set[int]] = [set() for _ in range(L)]
    out: list[tuple[int, ...]] = []
    for r in range(rounds):
        need = min(L, B - len(out))
        kept = np.zeros(L, dtype=bool)
        kept[by_likelihood[:need]] = True
        seqs = [[l] for l in range(L)]
        cum = p.copy()
        for pos in range(1, L):
            allowed = np.ones((L, L), dtype=bool)
            for i, s in enumerate(seqs):
                allowed[i, s] = False
                if pos == 1:
                    allowed[i, sorted(used_second[i])] = False
            gains = _scaled_gains(cum[:, None] + p[None, :], allowed & kept[:, None], t)
            gains[~kept] = 0.0  # placeholder rows only keep the round a Latin square
            weights = np.where(allowed, gains, -(L + 1.0))
            rows, cols = linear_sum_assignment(weights, maximize=True)
            if not np.all(allowed[rows, cols]):  # cannot happen: the allowed graph is regular
                raise RuntimeError(f"BMS matching failed at round {r}, position {pos + 1}")
            for i, j in zip(rows.tolist(), cols.tolist()):
                seqs[i].append(j)
                cum[i] += p[j]
        for i in np.flatnonzero(kept).tolist():
            if L > 1:
                used_second[i].add(seqs[i][1])
            out.append(tuple(seqs[i]))
    return out


# --------------------------------------------------------------------------------------------
# random baseline, scoring, dispatch
# --------------------------------------------------------------------------------------------


def random_sequences(L: int, B: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``B`` distinct permutations of ``range(L)`` drawn uniformly at random (seeded)."""
    L = _pos_int("L", L)
    B = _pos_int("B", B)
    _check_budget(L, B)
    rng = np.random.default_rng(seed)
    if L <= 8 and 2 * B >= math.factorial(L):
        perms = list(itertools.permutations(range(L)))
        idx = rng.choice(len(perms), size=B, replace=False)
        return [perms[i] for i in idx.tolist()]
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    while len(out) < B:
        s = tuple(int(x) for x in rng.permutation(L))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def sequence_score(
    seqs: Iterable[Sequence[int]], prior: Sequence[float], t: float = DEFAULT_T
) -> float:
    """The BMS objective: ``sum_seq sum_i i * (1 - sum_{l<=i} p_{seq_l})**t`` (1-based ``i``).

    Each term is the length ``i`` of a prefix weighted by (a power of) the probability that a
    single deletion misses that prefix. Higher is better.
    """
    p = validate_prior(prior)
    t = _check_t(t)
    total = 0.0
    for k, s in enumerate(seqs):
        s = [int(x) for x in s]
        if any(x < 0 or x >= p.size for x in s):
            raise PlanError(f"sequence {k}={tuple(s)} has a slice outside range(L={p.size})")
        total += _single_score(s, p, t)
    return total


def plan_sequences(
    L: int,
    B: int,
    method: str = "cyclic",
    prior: Sequence[float] | None = None,
    t: float = DEFAULT_T,
    seed: int = 0,
) -> list[tuple[int, ...]]:
    """Dispatch to a planner. ``method`` is one of ``cyclic``, ``bms``, ``random``.

    ``bms`` uses ``prior`` (uniform if ``None``); the other methods ignore it apart from checking
    its length when given.
    """
    L = _pos_int("L", L)
    B = _pos_int("B", B)
    if method not in METHODS:
        raise PlanError(f"unknown method={method!r}; valid methods: {', '.join(METHODS)}")
    if prior is not None:
        validate_prior(prior, L)
    if method == "cyclic":
        return cyclic_sequences(L, B)
    if method == "random":
        return random_sequences(L, B, seed)
    if prior is None:
        prior = [1.0 / L] * L
    return bms_sequences(prior, B, t=t, seed=seed)


# --------------------------------------------------------------------------------------------
# deletions
# --------------------------------------------------------------------------------------------


def surviving_prefix(seq: Sequence[int], hit_slices: Iterable[int]) -> int:
    """Length of the prefix of ``seq`` before its first slice in ``hit_slices``."""
    hit = set(hit_slices)
    for k, s in enumerate(seq):
        if s in hit:
            return k
    return len(seq)


def best_prefix(seqs: Sequence[Sequence[int]], hit_slices: Iterable[int]) -> tuple[int, int]:
    """``(index, length)`` of the sequence with the longest surviving prefix (ties: lowest index).

    A length of 0 means the shard is dead (every sequence's first slice was hit).
    """
    seqs = list(seqs)
    if not seqs:
        raise PlanError("seqs must be non-empty")
    hit = set(hit_slices)
    best_i, best_len = 0, -1
    for i, s in enumerate(seqs):
        n = surviving_prefix(s, hit)
        if n > best_len:
            best_i, best_len = i, n
    return best_i, best_len
