"""The web console's plain parts: the Bradley-Terry fit against hand-computed cases, the
bootstrap intervals, the leaderboard's counts, the vote store (battle-log shape, hashes with
prompt logging off, filters) and the operations view's histogram quantile."""

from __future__ import annotations

import hashlib
import math

import pytest

from llmrelay.api.arena import rating
from llmrelay.api.arena.ops import quantile
from llmrelay.api.arena.rating import Battle
from llmrelay.api.arena.store import Vote, VoteStore, hashed

ELO_3_TO_1 = 400 * math.log10(3)  # a model that takes 3 points of 4 is this far ahead


def battles(*spec: tuple[str, str, str, int]) -> list[Battle]:
    return [Battle(a, b, w) for a, b, w, n in spec for _ in range(n)]


def test_two_models_three_wins_to_one() -> None:
    r = rating.fit(battles(("a", "b", "model_a", 3), ("a", "b", "model_b", 1)))
    assert r["a"] - r["b"] == pytest.approx(ELO_3_TO_1, abs=1e-6)
    assert r["a"] + r["b"] == pytest.approx(2000, abs=1e-6)  # centred on 1000
    assert rating.expected(r["a"], r["b"]) == pytest.approx(0.75, abs=1e-9)


def test_a_tie_is_half_a_win_each_and_both_bad_is_a_tie() -> None:
    # a: one win and two ties, 1 + 0.5 + 0.5 = 2 points of 3; b: 1 of 3 -> 2 to 1
    tied = rating.fit(battles(("a", "b", "model_a", 1), ("b", "a", "tie", 1),
                              ("a", "b", "tie (bothbad)", 1)))
    assert tied["a"] - tied["b"] == pytest.approx(400 * math.log10(2), abs=1e-6)


def test_three_models_exact_proportions() -> None:
    # strengths 4 : 2 : 1 -> a beats b 2:1, b beats c 2:1, a beats c 4:1; with data in exactly
    # these proportions the maximum likelihood is the strengths themselves (geometric mean 2)
    r = rating.fit(battles(("a", "b", "model_a", 2), ("a", "b", "model_b", 1),
                           ("b", "c", "model_a", 2), ("c", "b", "model_a", 1),
                           ("a", "c", "model_a", 4), ("a", "c", "model_b", 1)))
    assert r["a"] == pytest.approx(1000 + 400 * math.log10(2), abs=1e-6)
    assert r["b"] == pytest.approx(1000, abs=1e-6)
    assert r["c"] == pytest.approx(1000 - 400 * math.log10(2), abs=1e-6)


def test_a_cycle_rates_everyone_the_same() -> None:
    r = rating.fit(battles(("a", "b", "model_a", 2), ("a", "b", "model_b", 1),
                           ("b", "c", "model_a", 2), ("b", "c", "model_b", 1),
                           ("c", "a", "model_a", 2), ("c", "a", "model_b", 1)))
    assert all(v == pytest.approx(1000, abs=1e-6) for v in r.values())


def test_prior_keeps_an_unbeaten_model_finite() -> None:
    one = battles(("a", "b", "model_a", 1))
    # one virtual tie: a has 1.5 of 2 points, the 3-to-1 case
    r = rating.fit(one, prior=1.0)
    assert r["a"] - r["b"] == pytest.approx(ELO_3_TO_1, abs=1e-6)


def test_bootstrap_interval_holds_the_fit_and_narrows_with_votes() -> None:
    few = battles(("a", "b", "model_a", 6), ("a", "b", "model_b", 2))
    many = few * 10
    fit = rating.fit(many, prior=1.0)
    ci_few, ci_many = (rating.bootstrap(x, rounds=200, prior=1.0, seed=1) for x in (few, many))
    lo, hi = ci_many["a"]
    assert lo <= fit["a"] <= hi
    assert hi - lo < ci_few["a"][1] - ci_few["a"][0]
    assert rating.bootstrap(many, 50, 1.0, seed=3) == rating.bootstrap(many, 50, 1.0, seed=3)


def test_leaderboard_rows() -> None:
    rows = rating.leaderboard(battles(("a", "b", "model_a", 3), ("a", "b", "model_b", 1),
                                      ("b", "a", "tie", 2), ("a", "a", "model_a", 5),
                                      ("a", "b", "nonsense", 1)), rounds=20)
    assert [r["model"] for r in rows] == ["a", "b"] and [r["rank"] for r in rows] == [1, 2]
    a = rows[0]
    assert (a["votes"], a["wins"], a["losses"], a["ties"]) == (6, 3, 1, 2)
    assert a["win_rate"] == 0.5
    assert a["ci_low"] <= a["rating"] <= a["ci_high"]
    assert rating.leaderboard([]) == []


def test_store_battle_log_shape_filters_and_hashes() -> None:
    clock = iter([100.0, 200.0, 300.0])
    store = VoteStore(":memory:", clock=lambda: next(clock))
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    store.add_now(Vote("smol", "gemma", "model_a", "anonymous", True, conv, conv))
    store.add_now(Vote("gemma", "smol", "tie (bothbad)", "team", False, conv, conv))
    (first, second) = store.battles_now()
    assert set(first) == {"question_id", "model_a", "model_b", "winner", "judge",
                          "conversation_a", "conversation_b", "turn", "anony", "language",
                          "tstamp"}
    assert (first["model_a"], first["winner"], first["anony"], first["turn"],
            first["tstamp"]) == ("smol", "model_a", True, 1, 100.0)
    assert first["conversation_a"] == conv
    assert [b["judge"] for b in store.battles_now(since=150)] == ["team"]
    assert [b["judge"] for b in store.battles_now(until=150)] == ["anonymous"]
    assert [b["winner"] for b in store.battles_now(key="team")] == ["tie (bothbad)"]
    assert store.keys_now() == ["anonymous", "team"]

    private = VoteStore(":memory:", log_prompts=False)
    private.add_now(Vote("smol", "gemma", "model_b", "k", False, conv, conv))
    (b,) = private.battles_now()
    assert b["conversation_a"] == hashed(conv) and "hi" not in str(b)
    assert b["conversation_a"][0] == {"role": "user",
                                      "sha256": hashlib.sha256(b'"hi"').hexdigest()}


def test_histogram_quantile() -> None:
    inf = float("inf")
    # 10 observations: 4 under 0.1 s, 4 more under 0.5 s, 2 more under 1 s
    buckets = [(0.1, 4.0), (0.5, 8.0), (1.0, 10.0), (inf, 10.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (5 - 4) / 4)
    assert quantile(0.95, buckets) == pytest.approx(0.5 + 0.5 * (9.5 - 8) / 2)
    assert quantile(0.2, buckets) == pytest.approx(0.05)
    assert quantile(0.99, [(0.1, 0.0), (inf, 3.0)]) == 0.1  # past the last bound: that bound
    assert quantile(0.5, [(0.1, 0.0), (inf, 0.0)]) is None
