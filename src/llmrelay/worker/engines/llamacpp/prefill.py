"""How many prompt rows a llama.cpp step takes while other sequences decode (chunked prefill).

Each step of the engine decodes one token of every generating sequence plus a chunk of any
prompt still being evaluated. On a CPU a prompt row costs about as much as a decode row, so a
step of 512 prompt rows takes seconds and every running stream waits that long for its next
token. vLLM and SGLang bound a step by a fixed token budget (`max_num_batched_tokens`,
`--chunked-prefill-size`), which on a GPU keeps a mixed step about as fast as a decode step; on
a CPU the right number of rows depends on the machine, the model and the context, so here the
budget is in time, as in Sarathi-Serve's stall-free batching: the scheduler measures what its
steps cost and gives prompts as many rows as keep a step with prompt rows at most SLOWDOWN
times a step of the decode rows alone.

`PrefillBudget` is plain Python with no clock of its own: the engine times each step and
reports it through `observe`, and asks `rows` before building the next one.

- No sequence decoding: prompts take the whole batch (`max_rows`), a lone prompt at full speed.
- Sequences decoding, no decode-only step measured yet: 0 prompt rows for one step, which
  measures the decode rows alone (a mixed step cannot tell decode rows from prompt rows).
- Decode cost known, prompt cost not yet: `floor` rows, which measures them.
- Both known: (SLOWDOWN - 1) x (the decode rows' time) / (seconds per prompt row), between
  `floor` (prompts always progress) and `max_rows` less the decode rows.

- A prompt of at most `short` rows left (a chat turn, a short question) goes in whole, whatever
  the budget: splitting it would delay its first token by several steps and keep the batch
  from filling (measured: 0.7x the tokens per second at 8 and 16 clients with 8-row chunks),
  and one step of a few dozen rows holds the streams only briefly. The budget is for long
  prompts; what a short one takes counts against it.

The floor and the slowdown trade one for the other: while streams decode, prompt rows get at
most (SLOWDOWN - 1) / SLOWDOWN of each step, so on a CPU (a prompt row costs about what a decode
row does) a long prompt takes at least SLOWDOWN / (SLOWDOWN - 1) times as long as in whole-batch
steps, which stall the streams instead (docs/benchmarks.md measures both).

Costs are exponential moving averages (weight WEIGHT for the newest step) of seconds per decode
row, from steps of decode rows only, and of seconds per prompt row, from mixed steps (the step's
time less its decode rows' estimated time). A prompt row's cost is measured only where prompts
are chunked (mixed steps): a row of a 512-row step costs less than one of a small chunk, and
would make the first chunks too large.
"""

from __future__ import annotations

from dataclasses import dataclass

# A step with prompt rows may take this many times as long as its decode rows alone: a running
# stream's inter-token latency stays within about twice its latency without prompts.
SLOWDOWN = 2.0
# Prompt rows per step at least, while sequences decode: a prompt always progresses.
FLOOR = 8
# A prompt with at most this many rows left goes in whole while others decode (the engine's
# EXACT_ROWS: a chunk this small keeps its cells' numbers exact).
SHORT = 48
# Weight of the newest step in the moving averages.
WEIGHT = 0.25
# A prompt row measured as costing less than this fraction of a decode row counts as this much
# (on a CPU they cost about the same; on a GPU a prompt row in a decode step is far cheaper).
CHEAPEST_PROMPT_ROW = 1 / 64


@dataclass
class PrefillBudget:
    """Prompt rows for the next step, from the measured cost of the steps before it."""

    max_rows: int
    slowdown: float = SLOWDOWN
    floor: int = FLOOR
    short: int = SHORT
    weight: float = WEIGHT
    per_decode_row: float | None = None  # seconds, from steps of decode rows only
    per_prompt_row: float | None = None  # seconds, from steps with decode and prompt rows

    def rows(self, decoding: int) -> int:
        """Prompt rows the next step may take while `decoding` sequences take a row each."""
        room = max(0, self.max_rows - decoding)
        if decoding == 0:
            return room
        if self.per_decode_row is None:
            return 0  # one step of decode rows only: it measures them
        if self.per_prompt_row is None:
            return min(self.floor, room)
        if self.per_prompt_row <= 0.0:
            return room  # not from measurements (observe never averages in less than cheapest)
        spare = (self.slowdown - 1.0) * decoding * self.per_decode_row
        return max(min(self.floor, room), min(room, int(spare / self.per_prompt_row)))

    def split(self, decoding: int, left: list[int]) -> list[int]:
        """The rows each waiting prompt takes in the next step (`left`: the rows each has
        left, in arrival order) while `decoding` rows decode: short ones whole, the others
        within the budget, all within the batch."""
        budget, room = self.rows(decoding), max(0, self.max_rows - decoding)
        takes = []
        for rows in left:
            whole = decoding > 0 and rows <= self.short
            take = min(rows, room if whole else min(budget, room))
            takes.append(take)
            budget, room = max(0, budget - take), room - take
        return takes

    def observe(self, decoding: int, prompt_rows: int, seconds: float) -> None:
        """A step of `decoding` decode rows and `prompt_rows` prompt rows took `seconds`."""
        if decoding <= 0:
            return  # prompts alone: full-size chunks, not the cost of a chunk between decodes
        if prompt_rows <= 0:
            self.per_decode_row = self._average(self.per_decode_row, seconds / decoding)
            return
        if self.per_decode_row is None:
            return
        prompt_seconds = seconds - decoding * self.per_decode_row
        # A step faster than its decode rows' estimate (noise) says little about its prompt
        # rows: counted as cheap, not as free, so one such step cannot open the whole batch.
        cheapest = self.per_decode_row * CHEAPEST_PROMPT_ROW
        self.per_prompt_row = self._average(self.per_prompt_row,
                                            max(prompt_seconds / prompt_rows, cheapest))

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.weight * (new - old)
