"""Speculative decoding for the llama.cpp engine: the policy, in plain Python.

A `Speculator` is one sequence's drafts: a `Proposer` that guesses the next tokens, and the
back-off that decides how many to ask for. Two proposers:
- n-gram (prompt lookup, `--speculative ngram`): a sequence's next tokens are often already
  written (an edit of a given file, an answer quoting a document, a tool result continued).
  `NgramIndex` keeps the n-grams of a sequence's prompt and text so far
  (`--ngram-min`..`--ngram-max` tokens) and, each step, looks up the last n tokens (longest n
  first): the tokens that followed their latest earlier occurrence are the draft.
- a draft model (`--speculative draft --draft-model-path`): a small model of the same
  vocabulary writes the next tokens greedily (draft.py).
Either way the engine puts the draft in the same llama_decode batch as the sequence's next token
(extra rows of that sequence), samples the target at each position, and keeps a draft token
while it equals what the target sampled there (exact: see engine.py); the KV cells of the
rejected draft tokens are then removed.

Drafts are not free: on a CPU each extra row of a step costs a good part of a step of one row,
and on a busy worker it slows every sequence of the step. So a draft token goes into a step
only where it pays: `RowCost` measures what a step costs per decode row (a least-squares line
of the decode-only steps' time against their rows; a step's time includes making its drafts, so
a draft model's passes count as part of each draft row's cost), which gives the break-even acceptance
`threshold`: the marginal row's time over the time per token the step yields. A draft token at
depth i is proposed only if the sequence's estimated acceptance rate p has p**i at least that
(one client on this repository's CPU: about 0.6; eight: above 0.9, so almost never).

Back-off: each sequence estimates p from its own recent drafts (a decaying count with an
optimistic prior). Once p is below the threshold it proposes nothing; after a cool-down of
COOLDOWN steps (doubled every time it fails again, up to MAX_COOLDOWN) it gets one probe with
its estimate reset to the prior (a probe that loses more than half its tokens backs off again at
once; one accepted whole resets the cool-down). A sequence whose drafts keep being rejected
proposes nothing after a few steps, and ever more rarely after that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

MODES = ("off", "ngram", "draft")  # --speculative
DEFAULT_TOKENS = 8  # --num-speculative-tokens
DEFAULT_NGRAM_MIN = 2  # --ngram-min
DEFAULT_NGRAM_MAX = 4  # --ngram-max

PRIOR_ACCEPTED = 3.0  # the estimate starts at 3 of 4 draft tokens accepted
PRIOR_TRIALS = 4.0
DECAY = 0.8  # weight of a sequence's earlier drafts each time it records a new one
COOLDOWN = 4  # steps without drafts after the estimate falls below the threshold (first time)
MAX_COOLDOWN = 256
DEFAULT_THRESHOLD = 0.5  # break-even acceptance before the row costs are measured
WEIGHT = 0.1  # of the newest step in RowCost's decaying sums


@dataclass(frozen=True)
class Settings:
    """A worker's speculation flags."""

    mode: str = "off"
    tokens: int = DEFAULT_TOKENS
    ngram_min: int = DEFAULT_NGRAM_MIN
    ngram_max: int = DEFAULT_NGRAM_MAX
    draft_model: Path | None = None  # --draft-model-path, with --speculative draft

    def check(self) -> str | None:
        """What is wrong with these flags, if anything."""
        if self.mode not in MODES:
            return f"--speculative must be one of {', '.join(MODES)}, not {self.mode!r}"
        if self.mode == "draft" and self.draft_model is None:
            return "--speculative draft needs --draft-model-path (a small GGUF model of the " \
                "same vocabulary)"
        if self.mode != "draft" and self.draft_model is not None:
            return f"--draft-model-path is used only with --speculative draft, not {self.mode}"
        if not 1 <= self.tokens <= 32:
            return f"--num-speculative-tokens must be 1..32, not {self.tokens}"
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            return (f"--ngram-min and --ngram-max must satisfy 1 <= min <= max <= 16, not "
                    f"{self.ngram_min}..{self.ngram_max}")
        return None

    @property
    def on(self) -> bool:
        return self.mode != "off"


class Proposer(Protocol):
    """Where a sequence's draft tokens come from."""

    def extend(self, tokens: list[int]) -> None:
        """Tokens added to the sequence (sampled or forced)."""

    def lookup(self, limit: int) -> list[int]:
        """Up to `limit` guesses of the sequence's next tokens; [] for none."""


class NgramIndex:
    """A `Proposer` by prompt lookup: the n-grams (n_min..n_max tokens) of a growing token
    list, each mapped to the position of the token that followed its latest occurrence."""

    def __init__(self, n_min: int, n_max: int, tokens: list[int] | None = None) -> None:
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self.follows: list[dict[tuple[int, ...], int]] = [{} for _ in range(n_max + 1)]
        self.extend(tokens or [])

    def extend(self, tokens: list[int]) -> None:
        toks = self.tokens
        for t in tokens:
            i = len(toks)  # t's position: it follows the n-grams that end just before it
            for n in range(self.n_min, min(self.n_max, i) + 1):
                self.follows[n][tuple(toks[i - n:i])] = i
            toks.append(t)

    def lookup(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest
        n-gram the list ends with; [] when none occurred before."""
        toks = self.tokens
        for n in range(min(self.n_max, len(toks)), self.n_min - 1, -1):
            at = self.follows[n].get(tuple(toks[-n:]))
            if at is not None:
                return toks[at:at + limit]
        return []


@dataclass
class Speculator:
    """One sequence's drafts: its proposer and its back-off (see the module docstring)."""

    proposer: Proposer
    max_tokens: int
    accepted: float = PRIOR_ACCEPTED  # decaying counts of its draft tokens
    trials: float = PRIOR_TRIALS
    cooldown: int = 0  # steps left without drafts
    next_cooldown: int = COOLDOWN
    proposed_total: int = 0
    accepted_total: int = 0
    drafts: int = 0  # steps with a draft
    probing: bool = False  # the next draft is the probe after a cool-down

    @classmethod
    def of(cls, settings: Settings, history: list[int]) -> Speculator:
        """An n-gram speculator for a sequence that holds `history` so far."""
        return cls(NgramIndex(settings.ngram_min, settings.ngram_max, history), settings.tokens)

    @property
    def rate(self) -> float:
        """The estimated probability that a draft token is accepted, given the one before was."""
        return self.accepted / self.trials

    def feed(self, tokens: list[int]) -> None:
        """Tokens added to the sequence (sampled or forced)."""
        self.proposer.extend(tokens)

    def propose(self, threshold: float, room: int) -> list[int]:
        """The draft for this step: at most `room` tokens, each at a depth whose estimated
        chance of acceptance is at least `threshold`; [] while backing off."""
        if self.cooldown > 0:
            self.cooldown -= 1
            if self.cooldown == 0:  # a probe: start again from the prior
                self.accepted, self.trials = PRIOR_ACCEPTED, PRIOR_TRIALS
                self.probing = True
            return []
        p = self.rate
        depth, chance = 0, p
        limit = min(self.max_tokens, room)
        while depth < limit and chance >= threshold:
            depth += 1
            chance *= p
        if depth == 0:
            self._back_off()
            return []
        return self.proposer.lookup(depth)

    def _back_off(self) -> None:
        self.cooldown = self.next_cooldown
        self.next_cooldown = min(self.next_cooldown * 2, MAX_COOLDOWN)

    def record(self, proposed: int, accepted: int) -> None:
        """A draft of `proposed` tokens of which the first `accepted` were kept."""
        if proposed <= 0:
            return
        self.drafts += 1
        self.proposed_total += proposed
        self.accepted_total += accepted
        trials = min(accepted + 1, proposed)  # tokens after a rejection were never tried
        self.accepted = self.accepted * DECAY + accepted
        self.trials = self.trials * DECAY + trials
        probe, self.probing = self.probing, False
        if accepted == proposed:
            self.next_cooldown = COOLDOWN  # it pays again
        elif probe and 2 * accepted < proposed:
            self._back_off()  # a failed probe: not a second try


@dataclass
class RowCost:
    """What a decode-only step costs: a line `base + per_row * rows` fitted to the steps seen
    (decaying sums, weight WEIGHT for the newest), from which the break-even acceptance."""

    weight: float = WEIGHT
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # w, wx, wy, wxx, wxy

    def observe(self, rows: int, seconds: float) -> None:
        keep = 1.0 - self.weight
        x, y = float(rows), seconds
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            self.sums[i] = self.sums[i] * keep + v

    def line(self) -> tuple[float, float] | None:
        """(base, per_row) seconds, once steps of different sizes were seen."""
        w, wx, wy, wxx, wxy = self.sums
        if w <= 0:
            return None
        var = wxx / w - (wx / w) ** 2
        if var < 1e-3:
            return None
        per_row = (wxy / w - (wx / w) * (wy / w)) / var
        base = wy / w - per_row * wx / w
        if per_row <= 0:
            return (max(base, 0.0), 0.0)
        return (max(base, 0.0), per_row)

    def threshold(self, decoding: int) -> float:
        """The acceptance probability at which one more draft row pays for itself in a step of
        `decoding` sequences (one token each): its time over the step's time per token."""
        fit = self.line()
        if fit is None or decoding <= 0:
            return DEFAULT_THRESHOLD
        base, per_row = fit
        step = base + per_row * decoding
        if step <= 0:
            return DEFAULT_THRESHOLD
        return min(1.0, per_row * decoding / step)
