"""Constraints (worker/constraints.py) and logit bias for the transformers engine, token by
token, per request: logits processors that run first in a request's own processors, alone in
`generate()` and inside the batch manager (compat.BatchProcessors).

The structured-generation library is llguidance (not xgrammar: see docs/architecture.md). One
`LLTokenizer` per model is made at load (`Grammars`). A constraint compiles once per distinct
constraint (cached by `Constraint.key`, least recently used dropped) to an llguidance grammar:
a plain schema to its JSON-schema grammar; markers (tool calls) to a Lark grammar, the literal
markers around an embedded `%json { schema }`, repeated up to `max_blocks`; an `alternative` to
a choice between the calls and one JSON value of that schema. JSON is compact (`", "` and
`": "`, no other whitespace): small models ramble in free whitespace; for the same reason an
object that lists its properties gets only those (`_closed`). A schema llguidance cannot
enforce (`not`, `uniqueItems`, ...) or an invalid one is refused when the request is admitted
(EngineError 40001 with llguidance's message, which names the keyword).

Each request gets its own matcher (a copy of the compiled one), fed with the tokens generated
since the processor last ran, read off the ids it is given (prompt + generated in both paths).
The mask is applied with numpy (llguidance.torch's helper is torch.compile'd: 31 s on its first
CPU call). A matcher that is done or in error allows only the end tokens. A lazy constraint
(`tool_choice: auto`) lets everything through until the generated text contains the opening
marker; the matcher then starts on the text from the marker on, re-tokenized from its bytes
(the marker may start or end inside a token: bytes the same token carries past the marker are
checked against the grammar too, and if they break it the answer can only end). If no token at
all is allowed, the processor leaves only an end token possible (the sampler never sees a row
of -inf) and records `error`, which the engine then ends that request with.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from llmrelay.protocol import ErrorCode
from llmrelay.worker.constraints import CompiledCache, Constraint
from llmrelay.worker.engines.base import EngineError

log = logging.getLogger("llmrelay.worker")

# Compact JSON: what the prompts show and small models follow best.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256


def refused(message: str) -> EngineError:
    return EngineError(message, ErrorCode.VALIDATION_TYPE_ERROR)


def _schema(schema: Any, where: str) -> dict[str, Any]:
    """The schema as llguidance gets it: a JSON object, its objects closed (`_closed`), with our
    JSON options (a client's own `x-guidance` options, e.g. `lenient`, would loosen what is
    enforced: replaced)."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise refused(f"the JSON schema of {where} must be a JSON object")
    closed = _closed(schema)
    return {**{k: v for k, v in closed.items() if k != "x-guidance"}, "x-guidance": JSON_OPTIONS}


_OPEN_ENDED = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref")


def _closed(schema: Any, in_all_of: bool = False) -> Any:
    """The schema with each object that lists its properties allowing only those, unless it says
    otherwise (as llama.cpp's converter and xgrammar's strict mode generate): what is generated
    still validates, and small models no longer append made-up keys until their length limit.
    Left open: `allOf` branches and schemas beside `allOf` or `$ref` (closing them could exclude
    the other parts' keys), and objects that require keys they do not list."""
    if isinstance(schema, list):
        return [_closed(s, in_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            out[key] = {name: _closed(sub) for name, sub in value.items()}
        elif key in ("items", "prefixItems", "additionalProperties", "anyOf", "oneOf", "not",
                     "if", "then", "else", "contains", "additionalItems"):
            out[key] = _closed(value)
        elif key == "allOf":
            out[key] = _closed(value, in_all_of=True)
        else:
            out[key] = value
    props, required = out.get("properties"), out.get("required")
    required = required if isinstance(required, list) else []
    if (isinstance(props, dict) and not in_all_of and not any(k in out for k in _OPEN_ENDED)
            and all(isinstance(r, str) and r in props for r in required)):
        out["additionalProperties"] = False
    return out


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def grammar_text(c: Constraint) -> str:
    """The llguidance grammar of a constraint (see the module docstring)."""
    import llguidance

    value = _schema(c.schema, "the request")
    if not (c.open or c.close) and c.alternative is None:
        return str(llguidance.LLMatcher.grammar_from_json_schema(value))
    # A newline just inside a marker is optional, as the model may or may not write it.
    opening, closing = c.open, c.close
    inner_open = inner_close = ""
    if opening.endswith("\n") and closing.startswith("\n"):
        opening, closing, inner_open, inner_close = opening[:-1], closing[1:], '"\\n"?', '"\\n"?'
    parts = [_literal(opening) if opening else "", inner_open, "value", inner_close,
             _literal(closing) if closing else ""]
    rules = [f"block: {' '.join(p for p in parts if p)}",
             f"value: %json {json.dumps(value, ensure_ascii=False)}"]
    blocks = "block"
    if c.max_blocks > 1:
        blocks = f'block ("\\n"? block){{0,{c.max_blocks - 1}}}'
    if c.alternative is not None:
        answer = _schema(c.alternative, "response_format")
        rules += [f"blocks: {blocks}", f"answer: %json {json.dumps(answer, ensure_ascii=False)}"]
        start = "blocks | answer"
    else:
        start = blocks
    return "\n".join([f"start: {start}", *rules]) + "\n"


def _message(error: str) -> str:
    """llguidance's error, its first line without the position in our grammar text."""
    first = error.strip().splitlines()[0] if error.strip() else "invalid grammar"
    return re.sub(r"^at \d+\(\d+\): ", "", first)


@dataclass
class Compiled:
    """A compiled constraint: a matcher in its start state (copied per request), and the
    opening marker of a lazy one (as bytes)."""

    matcher: Any  # llguidance.LLMatcher
    trigger: bytes | None


class Grammars:
    """A model's llguidance tokenizer and its compiled constraints (thread-safe)."""

    def __init__(self, hf_tokenizer: Any, n_vocab: int, eos_ids: list[int],
                 size: int = CACHE_SIZE) -> None:
        import llguidance.hf

        self.eos = sorted(eos_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=max(n_vocab, len(hf_tokenizer)), eos_token=self.eos or None)
        self.cache = CompiledCache(self._compile, size)
        self.lock = threading.Lock()

    @classmethod
    def load(cls, hf_tokenizer: Any, n_vocab: int, eos_ids: list[int]) -> Grammars | None:
        """The model's Grammars, or None (with a warning) when llguidance cannot serve it."""
        try:
            return cls(hf_tokenizer, n_vocab, eos_ids)
        except ImportError:
            log.warning("llguidance is not installed: tools and response_format are refused by "
                        "this worker (pip install 'llmrelay[transformers]')")
        except Exception as e:  # e.g. a slow (non-Rust) tokenizer
            log.warning("llguidance cannot use this model's tokenizer (%s: %s): tools and "
                        "response_format are refused by this worker", type(e).__name__, e)
        return None

    @property
    def compiled(self) -> int:
        """How many constraints were compiled (the others came from the cache)."""
        return self.cache.compiled

    def compile(self, c: Constraint) -> Compiled:
        """The compiled constraint (cached); EngineError 40001 when it cannot be enforced."""
        return self.cache.get(c)

    def _compile(self, c: Constraint) -> Compiled:
        import llguidance

        try:
            text = grammar_text(c)
        except EngineError:
            raise
        except Exception as e:  # llguidance raises ValueError for what is not JSON
            raise refused(f"the JSON schema cannot be enforced: {e}") from e
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise refused("the JSON schema cannot be enforced by the transformers engine "
                          f"(llguidance): {_message(matcher.get_error())}")
        return Compiled(matcher, c.open.rstrip().encode() if c.lazy and c.open.strip() else None)

    def processor(self, c: Constraint, n_prompt: int) -> Constrained:
        """A request's constraint processor (its own matcher)."""
        compiled = self.compile(c)
        with self.lock:  # one copy at a time of the shared start state
            matcher = compiled.matcher.deep_copy()
        return Constrained(self, matcher, compiled.trigger, n_prompt)


class DeadEnd(EngineError):
    """The constraint allows no next token: the constrained text cannot go on."""


class Constrained(LogitsProcessor):
    """One request's constraint, applied to its scores (one row) at every step."""

    def __init__(self, grammars: Grammars, matcher: Any, trigger: bytes | None,
                 n_prompt: int) -> None:
        import llguidance.numpy

        self.grammars = grammars
        self.matcher = matcher
        self.trigger = trigger  # lazy: the opening marker not seen yet
        self.text = bytearray()  # lazy: the text generated before the marker
        self.n_prompt = n_prompt
        self.seen = 0  # generated tokens handled so far
        self.mask = llguidance.numpy.allocate_token_bitmask(1, grammars.tokenizer.vocab_size)
        self.fill = llguidance.numpy.fill_next_token_bitmask
        self.error: EngineError | None = None  # set at a dead end

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[0, self.n_prompt + self.seen:].tolist()
        self.seen += len(new)
        if self.trigger is not None:
            if not self._triggered(new):
                return scores  # free text until the opening marker
        elif new and not self.matcher.consume_tokens(new):
            log.info("constrained generation: %s", _message(self.matcher.get_error()))
        row = scores[0]
        width = row.size(-1)
        if self.matcher.is_stopped():  # done, or in error: only an end token
            allowed = np.zeros(width, dtype=bool)
            allowed[[t for t in self.grammars.eos if t < width]] = True
        else:
            self.fill(self.matcher, self.mask)
            allowed = np.unpackbits(self.mask.view(np.uint8), bitorder="little").view(bool)
            if allowed.size < width:  # never the case when the logits' width was given
                allowed = np.concatenate([allowed, np.zeros(width - allowed.size, dtype=bool)])
            allowed = allowed[:width]
        _keep(row, allowed)
        if not bool(torch.isfinite(row).any()):
            self.error = DeadEnd("the output constraint allows no next token (the grammar made "
                                 "from the schema dead-ends here); the answer was ended")
            end = self.grammars.eos[0] if self.grammars.eos else 0
            row[end] = 0.0  # one possible token, so the sampler can pick; the engine fails it
        return scores

    def _triggered(self, new: list[int]) -> bool:
        """Lazy: watch the text for the opening marker; once there, start the matcher on the
        text from the marker on. Whether the constraint applies from now on."""
        assert self.trigger is not None
        if new:
            start = max(0, len(self.text) - len(self.trigger) + 1)
            self.text += self.grammars.tokenizer.decode_bytes(new)
            at = self.text.find(self.trigger, start)
            if at >= 0:
                tail = bytes(self.text[at:])
                self.trigger, self.text = None, bytearray()
                tokens = self.grammars.tokenizer.tokenize_bytes(tail)
                if not self.matcher.consume_tokens(tokens):
                    log.info("constrained generation: the text after the opening marker breaks "
                             "the constraint (%s); only an end token is left",
                             _message(self.matcher.get_error()))
                return True
        return False


def _keep(row: torch.Tensor, allowed: np.ndarray) -> None:
    """Set the scores of the tokens not `allowed` to -inf, in place."""
    if row.device.type == "cpu" and row.is_contiguous() and row.dtype in (torch.float32,
                                                                          torch.float16):
        np.copyto(row.numpy(), -np.inf, where=~allowed)
    else:
        row.masked_fill_(torch.from_numpy(~allowed).to(row.device), float("-inf"))


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: a value added to the scores of the given token ids."""

    def __init__(self, bias: dict[int, float], n_vocab: int) -> None:
        bad = [t for t in bias if not 0 <= t < n_vocab]
        if bad:
            raise EngineError(f"logit_bias: token id {bad[0]} is outside the vocabulary "
                              f"(0..{n_vocab - 1})", ErrorCode.PARAM_OUT_OF_RANGE)
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.ids.device != scores.device:
            self.ids, self.values = self.ids.to(scores.device), self.values.to(scores.device)
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores
