"""The speculation policy (llamacpp/speculate.py), without a model: n-gram lookup, back-off,
the break-even threshold from measured step costs, the flags' checks (a draft model's path
included), and the SPECULATIVE column of `llmrelay status`."""

from __future__ import annotations

import argparse

import pytest

from llmrelay import status
from llmrelay.config import add_worker_args
from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.engines.llamacpp.options import speculation
from llmrelay.worker.engines.llamacpp.speculate import (
    COOLDOWN,
    DEFAULT_THRESHOLD,
    NgramIndex,
    RowCost,
    Settings,
    Speculator,
)


def test_lookup_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    idx = NgramIndex(2, 3, [1, 2, 3, 4, 5, 6, 1, 2])
    assert idx.lookup(3) == [3, 4, 5]  # "1 2" was followed by 3 4 5
    idx.extend([3])
    assert idx.lookup(10) == [4, 5, 6, 1, 2, 3]  # "1 2 3", longest first, up to the end
    idx.extend([9])
    assert idx.lookup(4) == []  # "3 9" and "9" never occurred before (min 2)
    one = NgramIndex(1, 1, [7, 8, 7, 9, 7])
    assert one.lookup(1) == [9]  # the latest occurrence wins


def test_lookup_never_matches_the_suffix_with_itself() -> None:
    assert NgramIndex(2, 4, [1, 2]).lookup(4) == []
    assert NgramIndex(1, 2, [5, 5]).lookup(2) == [5]  # "5" followed by 5 at position 1


def test_a_sequence_whose_drafts_keep_failing_proposes_nothing_after_a_few_steps() -> None:
    text = [1, 2, 3, 4] * 20  # every 2-gram is followed by something: always a draft
    spec = Speculator.of(Settings("ngram", tokens=4), text)
    proposals = []
    for _ in range(40):
        draft = spec.propose(0.5, 8)
        proposals.append(len(draft))
        spec.record(len(draft), 0)  # the target never agrees
    assert proposals[0] > 0
    first_empty = proposals.index(0)
    assert first_empty <= 4
    # afterwards, mostly nothing: a probe after each cool-down, each cool-down longer
    probes = [i for i, p in enumerate(proposals) if p and i > first_empty]
    assert len(probes) <= 3
    assert sum(1 for p in proposals[first_empty:] if p == 0) >= 40 - first_empty - 3
    assert spec.next_cooldown > COOLDOWN * 2


def test_a_sequence_whose_drafts_are_accepted_keeps_proposing_the_longest_draft() -> None:
    spec = Speculator.of(Settings("ngram", tokens=6), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2])
    lengths = []
    for _ in range(20):
        draft = spec.propose(0.6, 32)
        lengths.append(len(draft))
        spec.record(len(draft), len(draft))
    assert lengths[0] >= 1 and lengths == sorted(lengths)  # deeper as the estimate rises
    assert lengths[-10:] == [6] * 10
    assert spec.rate > 0.9 and spec.accepted_total == spec.proposed_total == sum(lengths)


def test_the_draft_is_as_deep_as_its_chance_pays_and_never_past_the_room() -> None:
    spec = Speculator.of(Settings("ngram", tokens=8), list(range(20)) + [0, 1])
    spec.accepted, spec.trials = 0.8, 1.0
    assert len(spec.propose(0.6, 32)) == 2  # 0.8, 0.64 >= 0.6; 0.512 is not
    assert len(spec.propose(0.3, 32)) == 5  # 0.8**5 = 0.33
    assert len(spec.propose(0.3, 3)) == 3  # the batch's room


def test_row_cost_threshold_rises_with_the_batch() -> None:
    cost = RowCost()
    assert cost.threshold(1) == DEFAULT_THRESHOLD  # nothing measured yet
    for _ in range(5):
        cost.observe(1, 0.005)
    assert cost.threshold(1) == DEFAULT_THRESHOLD  # one size only: no line yet
    for rows in (1, 3, 5, 9, 2, 8):
        cost.observe(rows, 0.002 + 0.003 * rows)
    line = cost.line()
    assert line is not None and line[0] == pytest.approx(0.002) and line[1] == pytest.approx(0.003)
    assert cost.threshold(1) == pytest.approx(0.6)
    assert cost.threshold(8) == pytest.approx(0.024 / 0.026)


def worker_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_worker_args(p)
    return p.parse_args(list(argv))


def test_flags_and_their_checks() -> None:
    args = worker_args()
    assert speculation(args) == Settings("off")
    args = worker_args("--speculative", "ngram", "--num-speculative-tokens", "5",
                       "--ngram-min", "1", "--ngram-max", "3")
    assert speculation(args) == Settings("ngram", 5, 1, 3)
    with pytest.raises(SystemExit):
        worker_args("--speculative", "medusa")
    bad = argparse.Namespace(speculative="ngram", num_speculative_tokens=4, ngram_min=4,
                             ngram_max=2)
    with pytest.raises(EngineError, match="ngram-min"):
        speculation(bad)
    bad = argparse.Namespace(speculative="ngram", num_speculative_tokens=99, ngram_min=1,
                             ngram_max=2)
    with pytest.raises(EngineError, match="num-speculative-tokens"):
        speculation(bad)


def test_draft_model_flags_and_their_checks() -> None:
    from llmrelay.worker.models import resolve

    args = worker_args("--speculative", "draft", "--draft-model-path", "smollm2",
                       "--num-speculative-tokens", "4")
    assert speculation(args) == Settings("draft", 4, draft_model=resolve("smollm2").path)
    with pytest.raises(EngineError, match="needs --draft-model-path"):
        speculation(worker_args("--speculative", "draft"))
    with pytest.raises(EngineError, match="only with --speculative draft"):
        speculation(worker_args("--speculative", "ngram", "--draft-model-path", "smollm2"))
    with pytest.raises(EngineError, match="--draft-model-path: .*no-such-model"):
        speculation(worker_args("--speculative", "draft", "--draft-model-path",
                                "/nowhere/no-such-model.gguf"))


def test_status_shows_the_speculation_column_only_when_a_worker_speculates() -> None:
    def worker(name: str, spec: dict[str, object] | None) -> dict[str, object]:
        ours = {"engine": "llamacpp", "running": 0, "served": 3}
        if spec is not None:
            ours["speculative"] = spec
        return {"name": name, "model_names": ["smol"], "queue_length": 0, "speed": 1,
                "last_heart_beat": 99.0, "status": {"llmrelay": ours}}

    off = {"mode": "off", "proposed": 0, "accepted": 0, "acceptance_rate": None}
    table = {"now": 100.0, "heartbeat_interval": 3.0,
             "workers": [worker("http://a", off), worker("http://b", None)]}
    assert "SPECULATIVE" not in status.format_table(status.rows(table))
    table["workers"] += [
        worker("http://c", {"mode": "draft", "proposed": 400, "accepted": 392,
                            "acceptance_rate": 0.98, "draft_model": "small.gguf"}),
        worker("http://d", {"mode": "ngram", "proposed": 0, "accepted": 0,
                            "acceptance_rate": None})]
    lines = status.format_table(status.rows(table)).splitlines()
    assert "SPECULATIVE" in lines[0]
    by_address = {line.split()[1]: line for line in lines[1:]}
    assert by_address["http://c"].endswith("draft 98% (392/400)")
    assert by_address["http://d"].endswith("ngram, no drafts yet")
    assert by_address["http://a"].endswith("-") and by_address["http://b"].endswith("-")
