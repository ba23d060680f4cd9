"""The leaderboard's arithmetic, as FastChat's Chatbot Arena analysis does it (elo_analysis.py,
`compute_mle_elo`): a Bradley-Terry model fit to the votes, a tie counted as half a win for each
side ("both bad" is a tie too), ratings on the Elo scale (400 points: 10 to 1 odds) centred on
1000, and bootstrap confidence intervals (the votes resampled with replacement, refit, the
2.5th and 97.5th percentiles).

The fit is Hunter's MM algorithm (the maximum likelihood FastChat's logistic regression finds,
without scikit-learn). A model that never lost (or never won) has no finite maximum; `prior`
adds that many virtual ties to each pair of models that met, which keeps every rating finite
(the leaderboard uses one; 0 is FastChat's plain fit).

Plain Python and numpy; no HTTP, no database.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

SCALE = 400.0
BASE = 10.0
INIT = 1000.0
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")  # FastChat's `winner` values


@dataclass(frozen=True)
class Battle:
    """One vote: `winner` is one of WINNERS."""

    model_a: str
    model_b: str
    winner: str


def _tally(battles: Sequence[Battle], models: list[str], prior: float) -> np.ndarray:
    """wins[i, j]: the points model i took from model j (a win 1, a tie 0.5 each)."""
    index = {m: i for i, m in enumerate(models)}
    wins = np.zeros((len(models), len(models)))
    met = np.zeros_like(wins, dtype=bool)
    for b in battles:
        a, o = index[b.model_a], index[b.model_b]
        if a == o:
            continue
        met[a, o] = met[o, a] = True
        if b.winner == "model_a":
            wins[a, o] += 1
        elif b.winner == "model_b":
            wins[o, a] += 1
        else:
            wins[a, o] += 0.5
            wins[o, a] += 0.5
    return wins + met * (prior / 2)


def fit(battles: Sequence[Battle], prior: float = 0.0, iterations: int = 10_000,
        tol: float = 1e-10) -> dict[str, float]:
    """Bradley-Terry ratings of every model in `battles` (Elo scale, mean 1000 within the
    models that played). MM updates p_i <- W_i / sum_j n_ij / (p_i + p_j) until they move less
    than `tol`."""
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    if not models:
        return {}
    wins = _tally(battles, models, prior)
    games = wins + wins.T
    won = wins.sum(axis=1)
    p = np.ones(len(models))
    for _ in range(iterations):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, won / np.where(denom > 0, denom, 1), p)
        new = np.maximum(new, 1e-300)
        new /= math.exp(float(np.mean(np.log(new))))  # geometric mean 1: ratings average 1000
        if float(np.max(np.abs(np.log(new) - np.log(p)))) < tol:
            p = new
            break
        p = new
    ratings = INIT + SCALE * np.log(p) / math.log(BASE)
    return {m: float(r) for m, r in zip(models, ratings, strict=True)}


def expected(r_a: float, r_b: float) -> float:
    """The chance the model rated `r_a` beats the one rated `r_b`."""
    return 1.0 / (1.0 + BASE ** ((r_b - r_a) / SCALE))


def bootstrap(battles: Sequence[Battle], rounds: int = 100, prior: float = 0.0,
              seed: int = 0) -> dict[str, tuple[float, float]]:
    """The 95% interval of each model's rating over `rounds` resamplings of the votes (a model
    missing from a resample is left out of that round)."""
    if not battles or rounds <= 0:
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        pick = rng.integers(0, len(battles), len(battles))
        for m, r in fit([battles[i] for i in pick], prior, iterations=2000, tol=1e-8).items():
            samples.setdefault(m, []).append(r)
    return {m: (float(np.percentile(rs, 2.5)), float(np.percentile(rs, 97.5)))
            for m, rs in samples.items()}


def leaderboard(battles: Iterable[Battle], rounds: int = 100, prior: float = 1.0,
                seed: int = 0) -> list[dict[str, object]]:
    """One row per model, best first: rating, its 95% interval, votes, wins, losses, ties and
    the win rate (wins over votes; a tie is no win)."""
    battles = [b for b in battles if b.winner in WINNERS and b.model_a != b.model_b]
    ratings = fit(battles, prior)
    ci = bootstrap(battles, rounds, prior, seed)
    counts = {m: {"votes": 0, "wins": 0, "losses": 0, "ties": 0} for m in ratings}
    for b in battles:
        for me, side in ((b.model_a, "model_a"), (b.model_b, "model_b")):
            c = counts[me]
            c["votes"] += 1
            if b.winner == side:
                c["wins"] += 1
            elif b.winner in ("model_a", "model_b"):
                c["losses"] += 1
            else:
                c["ties"] += 1
    rows: list[dict[str, object]] = []
    for m, r in sorted(ratings.items(), key=lambda kv: (-kv[1], kv[0])):
        lo, hi = ci.get(m, (r, r))
        c = counts[m]
        rows.append({"model": m, "rating": round(r, 1), "ci_low": round(min(lo, r), 1),
                     "ci_high": round(max(hi, r), 1), **c,
                     "win_rate": round(c["wins"] / c["votes"], 4) if c["votes"] else 0.0})
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows
