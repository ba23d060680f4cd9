"""The llama.cpp engine's chunked-prefill budget (`PrefillBudget`): prompt rows per step from
measured step times, without a model. The engine itself is tested with the real model in
tests/test_batching.py."""

from __future__ import annotations

import pytest

from llmrelay.worker.engines.llamacpp.prefill import CHEAPEST_PROMPT_ROW, PrefillBudget


def test_an_idle_worker_gives_prompts_the_whole_batch() -> None:
    budget = PrefillBudget(512)
    assert budget.rows(0) == 512
    budget.observe(4, 0, 0.040)
    budget.observe(4, 20, 0.080)
    assert budget.rows(0) == 512  # measurements never shrink a lone prompt's chunks


def test_the_first_steps_measure_decode_rows_then_a_floor_of_prompt_rows() -> None:
    budget = PrefillBudget(512, floor=8)
    assert budget.rows(4) == 0  # nothing measured: one step of decode rows alone
    budget.observe(4, 0, 0.040)
    assert budget.per_decode_row == 0.010
    assert budget.rows(4) == 8  # prompt rows not measured yet: the floor
    budget.observe(4, 8, 0.056)
    assert budget.per_prompt_row is not None and abs(budget.per_prompt_row - 0.002) < 1e-12


def test_prompt_rows_keep_a_step_within_the_slowdown() -> None:
    # 4 decode rows take 40 ms; a prompt row 2 ms: with SLOWDOWN 2 the prompt rows may add
    # another 40 ms, 20 rows; with 3, 80 ms, 40 rows.
    for slowdown, expected in ((2.0, 20), (3.0, 40)):
        budget = PrefillBudget(512, slowdown=slowdown, per_decode_row=0.010, per_prompt_row=0.002)
        assert budget.rows(4) == expected
        assert budget.rows(8) == 2 * expected  # more decode rows: a longer step, as much again
    # a step of what the budget gave takes twice the decode rows' time, by the measurements
    budget = PrefillBudget(512, per_decode_row=0.010, per_prompt_row=0.002)
    assert 4 * 0.010 + budget.rows(4) * 0.002 <= 2 * 4 * 0.010 + 1e-12


def test_the_floor_and_the_batch_size_bound_the_rows() -> None:
    slow_prompts = PrefillBudget(512, floor=8, per_decode_row=0.001, per_prompt_row=1.0)
    assert slow_prompts.rows(4) == 8  # a prompt always progresses
    cheap_prompts = PrefillBudget(512, per_decode_row=0.010, per_prompt_row=1e-6)
    assert cheap_prompts.rows(4) == 508  # never more than the batch holds beside the decodes
    assert cheap_prompts.rows(512) == 0
    free = PrefillBudget(512, per_decode_row=0.010, per_prompt_row=0.0)  # set, not measured
    assert free.rows(4) == 508
    small = PrefillBudget(6, floor=8, per_decode_row=0.001, per_prompt_row=1.0)
    assert small.rows(4) == 2


def test_the_averages_follow_the_measurements() -> None:
    budget = PrefillBudget(512, weight=0.5)
    budget.observe(2, 0, 0.020)
    budget.observe(2, 0, 0.040)
    assert budget.per_decode_row is not None and abs(budget.per_decode_row - 0.015) < 1e-12
    budget.observe(2, 10, 0.030 + 0.050)  # 0.030 of decode rows, 0.050 for 10 prompt rows
    budget.observe(2, 10, 0.030 + 0.030)
    assert budget.per_prompt_row is not None and abs(budget.per_prompt_row - 0.004) < 1e-12
    budget.observe(2, 10, 0.010)  # faster than the decode rows' estimate: counted as cheap
    cheapest = 0.015 * CHEAPEST_PROMPT_ROW
    assert abs(budget.per_prompt_row - (0.004 + cheapest) / 2) < 1e-12
    first = PrefillBudget(512, per_decode_row=0.010)
    first.observe(4, 8, 0.030)  # a first sample below the decode rows' estimate
    assert first.per_prompt_row == 0.010 * CHEAPEST_PROMPT_ROW
    assert first.rows(4) == 256  # bounded: not the whole batch
    budget.observe(0, 512, 0.500)  # prompts alone: not a chunk's cost, ignored
    assert abs(budget.per_prompt_row - (0.004 + cheapest) / 2) < 1e-12


def test_a_slower_machine_gets_smaller_chunks() -> None:
    """Fed by a simulated clock: the chunk follows the cost of prompt rows as it changes."""
    budget = PrefillBudget(512)
    decode_row, prompt_row = 0.005, 0.001
    chunks = []
    for step in range(200):
        if step == 100:
            prompt_row = 0.002  # the machine got busier, or the prompt's context longer
        rows = budget.rows(4)
        budget.observe(4, rows, 4 * decode_row + rows * prompt_row)
        chunks.append(rows)
    assert chunks[0] == 0 and chunks[1] == budget.floor
    assert chunks[99] == 20 and chunks[199] == 10


def test_the_slowdown_is_a_worker_flag_above_one() -> None:
    import argparse

    from llmrelay.config import add_worker_args

    p = argparse.ArgumentParser()
    add_worker_args(p)
    assert p.parse_args([]).prefill_slowdown == 2.0
    assert p.parse_args(["--prefill-slowdown", "4"]).prefill_slowdown == 4.0
    with pytest.raises(SystemExit):
        p.parse_args(["--prefill-slowdown", "1"])


def test_a_short_prompt_goes_in_whole_and_long_ones_share_the_budget() -> None:
    budget = PrefillBudget(512, floor=8, short=48)
    budget.observe(4, 0, 0.040)  # 10 ms per decode row
    budget.observe(4, 8, 0.120)  # 10 ms per prompt row: 4 rows keep a step within 2x
    assert budget.rows(4) == 8  # the floor
    # a chat turn of 30 rows whole; a long prompt then gets what the budget has left (none),
    # and a second short one whole too: they all count against the batch
    assert budget.split(4, [30, 2000, 40]) == [30, 0, 40]
    assert budget.split(4, [2000, 30]) == [8, 30]
    assert budget.split(0, [2000, 30]) == [512, 0]  # nothing decoding: the whole batch, in order
    assert budget.split(500, [40, 40]) == [12, 0]  # never past the batch
