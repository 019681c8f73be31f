"""Monte-Carlo deletion-rate simulator for S3T and its closed form.

Model (Chowdhury et al., ICLR 2025, section 4): ``m`` shards, each split into ``L`` slices and
trained on ``B`` slice orderings ("sequences", see :mod:`s3t_llm.planner`). Deletion requests
arrive i.i.d. over the ``m*L`` (shard, slice) cells; a cell can be hit any number of times. A hit
on slice ``j`` of a shard truncates each of that shard's sequences to the prefix before ``j``. A
shard is dead once all of its sequences have length 0, i.e. once the first slice of every one of
its sequences has been hit; the system has to retrain when every shard is dead.

*Requests served before retraining* is the index (1-based) of the request that kills the last
shard, i.e. the number of draws until all ``m*B'`` "first slice" cells have been hit, where
``B'`` is the number of distinct first slices in a shard's plan. For uniform deletions this is a
coupon-collector time with mean ``m*L*H(m*B')`` (``H`` the harmonic number); SISA is ``B'=1``.
For a non-uniform prior its mean is computed exactly by :func:`expected_requests`.

matplotlib is imported only inside :func:`plot_budget_curves`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .planner import DEFAULT_T, PlanError, check_sequences, plan_sequences, validate_prior

__all__ = [
    "SimResult",
    "DELETION_DISTS",
    "harmonic",
    "closed_form_requests",
    "expected_requests",
    "slice_prior",
    "simulate",
    "budget_table",
    "format_table",
    "plot_budget_curves",
    "default_report",
]

DELETION_DISTS = ("uniform", "zipf")


def harmonic(n: int) -> float:
    """The harmonic number ``H(n) = 1 + 1/2 + ... + 1/n`` (``H(0) = 0``)."""
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative int, got n={n!r}")
    n = int(n)
    return math.fsum(1.0 / k for k in range(1, n + 1))


def _pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return int(value)


def _distinct_first(sequences: Sequence[Sequence[int]]) -> list[int]:
    return sorted({int(s[0]) for s in sequences})


def closed_form_requests(
    m: int, L: int, B: int, sequences: Sequence[Sequence[int]] | None = None
) -> float:
    """``m * L * H(m * B')``: expected requests served before retraining under uniform deletions.

    ``B'`` is the number of distinct first slices of ``sequences``; without sequences it is
    ``min(B, L)``, which is what the cyclic plan (and BMS) give.
    """
    m, L, B = _pos_int("m", m), _pos_int("L", L), _pos_int("B", B)
    b_prime = len(_distinct_first(sequences)) if sequences is not None else min(B, L)
    return m * L * harmonic(m * b_prime)


def slice_prior(
    L: int,
    deletion_dist: str = "uniform",
    zipf_a: float = 1.0,
    prior: Sequence[float] | None = None,
) -> np.ndarray:
    """Probability that a deletion hits each slice (shards are always equally likely).

    An explicit ``prior`` wins; otherwise ``uniform`` or ``zipf`` (slice ``l`` has weight
    ``1 / (l+1)**zipf_a``, so slice 0 is the most deleted).
    """
    L = _pos_int("L", L)
    if prior is not None:
        return validate_prior(prior, L)
    if deletion_dist == "uniform":
        return np.full(L, 1.0 / L)
    if deletion_dist == "zipf":
        a = float(zipf_a)
        if not math.isfinite(a) or a < 0:
            raise ValueError(f"zipf_a must be a finite number >= 0, got zipf_a={zipf_a!r}")
        w = 1.0 / np.arange(1, L + 1, dtype=float) ** a
        return w / w.sum()
    raise ValueError(
        f"unknown deletion_dist={deletion_dist!r}; valid: {', '.join(DELETION_DISTS)}"
    )


def expected_requests(
    m: int, sequences: Sequence[Sequence[int]], prior: Sequence[float] | None = None
) -> float:
    """Exact expected requests before retraining for any slice prior.

    Poissonising the request stream (rate 1) does not change the mean (Wald), and the first-hit
    times of the cells become independent exponentials with rates ``q_c = prior[l] / m``, so

        E = integral_0^inf [1 - prod_{first-slice cells c} (1 - exp(-q_c * s))] ds.

    For the uniform prior this equals :func:`closed_form_requests`. Infinite if a first slice has
    probability 0 (that shard never dies).
    """
    from scipy.integrate import quad

    m = _pos_int("m", m)
    seqs = [tuple(s) for s in sequences]
    L = len(seqs[0])
    p = np.full(L, 1.0 / L) if prior is None else validate_prior(prior, L)
    rates = p[_distinct_first(seqs)] / m
    if np.any(rates <= 0):
        return math.inf
    if np.allclose(rates, rates[0], rtol=0, atol=1e-15) and abs(rates[0] * m * L - 1) < 1e-12:
        return closed_form_requests(m, L, 1, seqs)

    def survival(s: float) -> float:
        # 1 - prod (1 - e^{-q s})^m, computed stably
        log_prod = m * np.sum(np.log1p(-np.exp(-rates * s)))
        return float(-np.expm1(log_prod))

    upper = (math.log(m * rates.size) + 60.0) / float(rates.min())
    scale = 1.0 / float(rates.min())
    points = [scale * k for k in (0.5, 1, 2, 4, 8, 16) if scale * k < upper]
    val, _err = quad(survival, 0.0, upper, limit=500, points=points)
    return float(val)


@dataclass
class SimResult:
    """Outcome of :func:`simulate`.

    ``counts[i]`` is the number of requests trial ``i`` served before retraining (the request
    that killed the last shard included). ``prefix_curve[s]`` is the mean over trials and shards
    of the best surviving prefix length after ``s`` requests (``prefix_curve[0] == L``); once a
    trial has retrained it contributes 0. ``closed_form`` is the exact expectation:
    ``m*L*H(m*B')`` for uniform deletions, :func:`expected_requests` otherwise.
    """

    mean: float
    stderr: float
    ci95: float
    closed_form: float
    prefix_curve: np.ndarray
    counts: np.ndarray
    sequences: list[tuple[int, ...]]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def std(self) -> float:
        return float(self.counts.std(ddof=1)) if self.counts.size > 1 else 0.0

    def summary(self) -> str:
        p = self.params
        return (
            f"m={p.get('m')} L={p.get('L')} B={p.get('B')} method={p.get('method')} "
            f"dist={p.get('deletion_dist')}: {self.mean:.2f} +/- {self.ci95:.2f} "
            f"(closed form {self.closed_form:.2f}, n={self.counts.size})"
        )


def _sample_cells(rng: np.random.Generator, cdf: np.ndarray | None, C: int, shape) -> np.ndarray:
    if cdf is None:
        return rng.integers(0, C, size=shape)
    idx = np.searchsorted(cdf, rng.random(size=shape), side="right")
    return np.minimum(idx, C - 1)


def simulate(
    m: int,
    L: int,
    B: int,
    *,
    method: str = "cyclic",
    n_trials: int = 2000,
    seed: int = 0,
    prior: Sequence[float] | None = None,
    deletion_dist: str = "uniform",
    zipf_a: float = 1.0,
    track_prefix: bool = True,
    horizon: int | None = None,
    sequences: Sequence[Sequence[int]] | None = None,
    t: float = DEFAULT_T,
) -> SimResult:
    """Monte-Carlo estimate of the requests an S3T system serves before it must retrain.

    Every shard uses the same plan: ``sequences`` if given, else
    ``plan_sequences(L, B, method, prior=<deletion prior>, t=t, seed=seed)`` (so ``bms`` plans
    for the prior the requests are drawn from). Requests are i.i.d. over the ``m*L`` cells:
    shards uniformly, slices by ``prior`` if given, else by ``deletion_dist`` (``uniform`` or
    ``zipf`` with exponent ``zipf_a``).

    Trials are simulated together with numpy, in chunks of requests, until every trial has
    retrained. With ``track_prefix`` the mean best surviving prefix after each of the first
    ``horizon`` requests is returned (``horizon`` defaults to the longest trial).
    """
    m, L, B = _pos_int("m", m), _pos_int("L", L), _pos_int("B", B)
    n = _pos_int("n_trials", n_trials)
    p = slice_prior(L, deletion_dist, zipf_a, prior)
    uniform = prior is None and deletion_dist == "uniform"
    if sequences is None:
        seqs = plan_sequences(L, B, method, prior=None if uniform else p, t=t, seed=seed)
    else:
        seqs = check_sequences(sequences, L)
        if len(seqs) != B:
            raise PlanError(f"B={B} but {len(seqs)} sequences were given")
        method = "given"
    first = _distinct_first(seqs)
    if np.any(p[first] <= 0):
        raise ValueError(
            f"first slice(s) {[f for f in first if p[f] <= 0]} have deletion probability 0: "
            "shards never die and the expected number of requests is infinite"
        )
    closed = closed_form_requests(m, L, B, seqs) if uniform else expected_requests(m, seqs, p)

    C = m * L
    cdf = None if uniform else np.cumsum(np.tile(p, m) / m)
    target = np.array([i * L + f for i in range(m) for f in first], dtype=np.intp)
    rng = np.random.default_rng(seed)

    # Requests are drawn in blocks of a size that depends only on (m, L), for every trial, also
    # finished ones: trial i then sees the same request stream whatever B, method or plan is
    # simulated with the same seed (common random numbers), so e.g. S3T >= SISA trial by trial.
    first_hit = np.full((n, C), np.inf)
    active = np.arange(n)
    offset = 0
    chunk = max(64, int(math.ceil(C * harmonic(C) / 2)))
    while active.size:
        draws = _sample_cells(rng, cdf, C, (n, chunk))[active]
        k = active.size
        steps = np.arange(offset + 1, offset + chunk + 1, dtype=float)
        sub = first_hit[active]
        rows = np.repeat(np.arange(k), chunk)
        np.minimum.at(sub, (rows, draws.ravel()), np.tile(steps, k))
        first_hit[active] = sub
        offset += chunk
        done = np.isfinite(sub[:, target]).all(axis=1)
        active = active[~done]

    counts = first_hit[:, target].max(axis=1).astype(np.int64)
    mean = float(counts.mean())
    std = float(counts.std(ddof=1)) if n > 1 else 0.0
    stderr = std / math.sqrt(n)

    if track_prefix:
        H = int(counts.max()) if horizon is None else int(horizon)
        if H < 0:
            raise ValueError(f"horizon must be >= 0, got horizon={horizon!r}")
        S = np.array(seqs, dtype=np.intp)  # (B, L)
        per_shard = first_hit.reshape(n, m, L)[:, :, S]  # (n, m, B, L)
        # a prefix of length k of a sequence survives s requests iff all its slices' first hits
        # come after s; the shard's best prefix is >= k iff some sequence's k-prefix survives
        death = np.minimum.accumulate(per_shard, axis=3).max(axis=2)  # (n, m, L), finite
        clipped = np.minimum(death, H + 1).astype(np.int64).ravel()
        hist = np.bincount(clipped, minlength=H + 2)
        alive = clipped.size - np.cumsum(hist)[: H + 1]  # #{death > s}, s = 0..H
        curve = alive / float(n * m)
    else:
        curve = np.empty(0)

    params = dict(
        m=m, L=L, B=B, method=method, n_trials=n, seed=seed, deletion_dist=(
            "prior" if prior is not None else deletion_dist
        ), zipf_a=zipf_a, prior=p.tolist(), t=t, b_prime=len(first),
    )
    return SimResult(
        mean=mean,
        stderr=stderr,
        ci95=1.96 * stderr,
        closed_form=float(closed),
        prefix_curve=curve,
        counts=counts,
        sequences=[tuple(s) for s in seqs],
        params=params,
    )


def budget_table(
    configs: Sequence[tuple[int, int, int]],
    n_trials: int = 2000,
    seed: int = 0,
    *,
    method: str = "cyclic",
    deletion_dist: str = "uniform",
    zipf_a: float = 1.0,
) -> list[dict[str, Any]]:
    """One row per ``(m, L, B)``: simulated mean and 95% CI, closed form, and the ratio to SISA.

    SISA is the same ``(m, L)`` with ``B = 1`` and the order ``(0, .., L-1)``. It is simulated
    with the same seed, so both see the same request streams (common random numbers): the
    simulated ratio is less noisy and, for nested first slices, never below 1 trial by trial.
    """
    rows: list[dict[str, Any]] = []
    sisa: dict[tuple[int, int], SimResult] = {}
    for m, L, B in configs:
        key = (m, L)
        if key not in sisa:
            sisa[key] = simulate(
                m, L, 1, method="cyclic", n_trials=n_trials, seed=seed,
                deletion_dist=deletion_dist, zipf_a=zipf_a, track_prefix=False,
            )
        if B == 1 and method == "cyclic":
            res = sisa[key]
        else:
            res = simulate(
                m, L, B, method=method, n_trials=n_trials, seed=seed,
                deletion_dist=deletion_dist, zipf_a=zipf_a, track_prefix=False,
            )
        base = sisa[key]
        rows.append(
            dict(
                m=m, L=L, B=B, method=method, deletion_dist=deletion_dist,
                sim_mean=res.mean, sim_ci95=res.ci95, sim_stderr=res.stderr,
                closed_form=res.closed_form,
                ratio_sim=res.mean / base.mean,
                ratio_closed=res.closed_form / base.closed_form,
                n_trials=n_trials,
            )
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Render :func:`budget_table` rows as an aligned markdown table."""
    header = ["m", "L", "B", "simulated (mean ± 95% CI)", "closed form", "S3T/SISA sim",
              "S3T/SISA closed"]
    body = [
        [
            str(r["m"]), str(r["L"]), str(r["B"]),
            f"{r['sim_mean']:.2f} ± {r['sim_ci95']:.2f}",
            f"{r['closed_form']:.2f}",
            f"{r['ratio_sim']:.3f}",
            f"{r['ratio_closed']:.3f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    right = [True, True, True, True, True, True, True]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)
        ) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def plot_budget_curves(
    path: str,
    m_L_pairs: Sequence[tuple[int, int]] = ((5, 4), (5, 6)),
    n_trials: int = 500,
    seed: int = 0,
    deletion_dist: str = "uniform",
    *,
    zipf_a: float = 1.0,
    method: str = "cyclic",
) -> str:
    """Write a two-panel PNG to ``path`` and return ``path``.

    Left: expected requests before retraining against the budget ``B = 1 .. L`` for each
    ``(m, L)``: simulated means with 95% error bars and the exact expectation as a line.
    Right: mean best surviving prefix (over shards and trials, as a fraction of ``L``) against the
    number of requests served, SISA (``B=1``, dashed) vs S3T (``B=L``, solid).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xmax = 1.0
    for idx, (m, L) in enumerate(m_L_pairs):
        color = colors[idx % len(colors)]
        budgets = list(range(1, L + 1))
        results = [
            simulate(m, L, B, method=method, n_trials=n_trials, seed=seed,
                     deletion_dist=deletion_dist, zipf_a=zipf_a, track_prefix=B in (1, L))
            for B in budgets
        ]
        ax1.errorbar(budgets, [r.mean for r in results], yerr=[r.ci95 for r in results],
                     fmt="o", color=color, capsize=3, ms=4, label=f"m={m}, L={L} simulated")
        ax1.plot(budgets, [r.closed_form for r in results], "-", color=color, alpha=0.7,
                 label=f"m={m}, L={L} exact")
        sisa, s3t = results[0], results[-1]
        # each curve runs until its last trial retrained and is 0 after that: pad with zeros,
        # and cut at the 99th percentile of the S3T counts
        horizon = max(sisa.prefix_curve.size, s3t.prefix_curve.size)
        xmax = max(xmax, float(np.percentile(s3t.counts, 99)))
        for r, ls, name in ((sisa, "--", "SISA"), (s3t, "-", f"S3T B={L}")):
            curve = np.pad(r.prefix_curve, (0, horizon - r.prefix_curve.size)) / L
            ax2.plot(np.arange(horizon), curve, ls, color=color, label=f"m={m}, L={L} {name}")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("budget B (sequences per shard)")
    ax1.set_ylabel("requests served before retraining")
    ax1.set_title(f"Deletion capacity vs budget ({deletion_dist} deletions, {method})")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("deletion requests served")
    ax2.set_xlim(0, xmax)
    ax2.set_ylabel("mean best surviving prefix / L")
    ax2.set_title("Surviving prefix over time (mean over shards and trials)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


DEFAULT_CONFIGS: tuple[tuple[int, int, int], ...] = (
    *((5, 4, b) for b in range(1, 5)),
    *((5, 6, b) for b in range(1, 7)),
    (2, 20, 1),
    (2, 20, 20),
)


def default_report(
    n_trials: int = 2000, seed: int = 0, out_png: str | None = "simulate.png"
) -> str:
    """Budget table for (5,4,B=1..4), (5,6,B=1..6), (2,20,1), (2,20,20) under uniform deletions.

    Also writes the :func:`plot_budget_curves` PNG for ``(m, L)`` in (5,4), (5,6), (2,20) to
    ``out_png`` (skipped when it is ``None`` or empty). Returns the table text.
    """
    rows = budget_table(list(DEFAULT_CONFIGS), n_trials=n_trials, seed=seed)
    if out_png:
        plot_budget_curves(out_png, ((5, 4), (5, 6), (2, 20)), n_trials=n_trials, seed=seed)
    return format_table(rows)
