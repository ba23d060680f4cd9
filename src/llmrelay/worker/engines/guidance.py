"""Constraints (worker/constraints.py) through llguidance, for every engine that samples itself
(llama.cpp, transformers): one compilation, one set of refusals, one per-request matcher. Each
engine brings its vocabulary as an `llguidance.LLTokenizer` (llguidance's own bridges:
`llguidance.llamacpp`, `llguidance.hf`) and applies the matcher's verdicts in its own sampler.

A constraint compiles once per distinct constraint (cached by `Constraint.key`, least recently
used dropped) to an llguidance grammar: a plain schema to its JSON-schema grammar; markers (tool
calls) to a Lark grammar, the literal markers around an embedded `%json { schema }`, repeated up
to `max_blocks`; an `alternative` to a choice between the calls and one JSON value of that
schema. JSON is compact (`", "` and `": "`, no other whitespace): small models ramble in free
whitespace; for the same reason an object that lists its properties gets only those
(`_closed`). JSON strings never hold a raw control character (llguidance follows RFC 8259).

What is enforced is llguidance's JSON Schema support (docs/tools.md lists it): types, `enum`,
`const`, `anyOf`, `oneOf` whose branches cannot overlap, `allOf`, `$ref`/`$defs` (recursion
too), numeric bounds and `multipleOf`, string lengths, `pattern`, `format`, item counts, tuples,
property counts, `patternProperties`. A keyword it cannot enforce (`not`, `uniqueItems`,
`if`/`then`, `contains`, ...), an unknown `format`, a regex it cannot run or an invalid schema is
refused when the request is admitted (EngineError 40001 with llguidance's message, which names
the keyword), the same on every engine; a client's own `x-guidance` options (e.g. `lenient`,
which ignores such keywords) are replaced by ours. Keywords that are annotations in JSON Schema
(`title`, `description`, `default`, `examples`, `contentMediaType`, unknown names) constrain
nothing, as for any validator.

`Guide` is one request's matcher (a copy of the compiled one), fed with the tokens generated.
A lazy constraint (`tool_choice: auto`), and one that holds only `after` a reasoning block, let
everything through until the generated text contains the opening marker (the block's closing
marker); the matcher then starts on the text from the marker on,
re-tokenized from its bytes (the marker may start or end inside a token: bytes the same token
carries past the marker are checked against the grammar too, and if they break it the answer
can only end). A matcher that is done or in error allows only the end tokens.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    _safe_integer(out)
    props, required = out.get("properties"), out.get("required")
    required = required if isinstance(required, list) else []
    if (isinstance(props, dict) and not in_all_of and not any(k in out for k in _OPEN_ENDED)
            and all(isinstance(r, str) and r in props for r in required)):
        out["additionalProperties"] = False
    return out


SAFE_INTEGER = 2**53 - 1  # RFC 7493 (I-JSON): the integers every JSON parser holds exactly


def _safe_integer(schema: dict[str, Any]) -> None:
    """An integer with no bound on a side gets the I-JSON one there (in place): what is
    generated still validates, and a small model no longer writes digits until its length
    limit (llama.cpp's own converter stops integers at 16 digits for the same reason)."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "integer" not in kinds or "number" in kinds:
        return
    low = [v for k in ("minimum", "exclusiveMinimum") if _is_number(v := schema.get(k))]
    high = [v for k in ("maximum", "exclusiveMaximum") if _is_number(v := schema.get(k))]
    if not low and all(h >= -SAFE_INTEGER for h in high):
        schema["minimum"] = -SAFE_INTEGER
    if not high and all(lo <= SAFE_INTEGER for lo in low):
        schema["maximum"] = SAFE_INTEGER


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def grammar_text(c: Constraint) -> str:
    """The llguidance grammar of a constraint (see the module docstring)."""
    import llguidance

    value = _schema(c.schema, "the request")
    after = _after(c)
    if not (c.open or c.close) and c.alternative is None and not after:
        return str(llguidance.LLMatcher.grammar_from_json_schema(value))
    rules = [f"value: %json {json.dumps(value, ensure_ascii=False)}"]
    body = "value"
    if c.open or c.close:
        # A newline just inside a marker is optional, as the model may or may not write it.
        opening, closing = c.open, c.close
        inner_open = inner_close = ""
        if opening.endswith("\n") and closing.startswith("\n"):
            opening, closing, inner_open, inner_close = opening[:-1], closing[1:], '"\\n"?', '"\\n"?'
        parts = [_literal(opening) if opening else "", inner_open, "value", inner_close,
                 _literal(closing) if closing else ""]
        rules.append(f"block: {' '.join(p for p in parts if p)}")
        body = "block"
        if c.max_blocks > 1:
            body = f'block ("\\n"? block){{0,{c.max_blocks - 1}}}'
    if c.alternative is not None:
        answer = _schema(c.alternative, "response_format")
        rules += [f"blocks: {body}", f"answer: %json {json.dumps(answer, ensure_ascii=False)}"]
        body = "blocks | answer"
    # After a reasoning block: its closing marker, blank lines, then what is constrained.
    start = f'{_literal(after)} /[ \\t\\n]*/ ({body})' if after else body
    return "\n".join([f"start: {start}", *rules]) + "\n"


def _after(c: Constraint) -> str:
    """The marker a constraint waits for before it holds (the end of the reasoning). A lazy
    constraint (`tool_choice: auto`) already lets free text through until its own marker."""
    return c.after if c.after and not c.lazy else ""


def message(error: str) -> str:
    """llguidance's error on one line (a regex error spans several), without the position in
    our grammar text, at most 400 characters."""
    text = re.sub(r"^at \d+\(\d+\): ", "", " ".join(error.split())) or "invalid grammar"
    return text if len(text) <= 400 else text[:399] + "…"


@dataclass
class Compiled:
    """A compiled constraint: a matcher in its start state (copied per request), and the
    opening marker of a lazy one (as bytes)."""

    matcher: Any  # llguidance.LLMatcher
    trigger: bytes | None


class Grammars:
    """A model's llguidance tokenizer, its end tokens and its compiled constraints (thread-safe).
    `make_tokenizer` gives an `llguidance.LLTokenizer` over the model's whole vocabulary, `eos`
    among its EOS tokens (what a finished or broken matcher still allows); it is called once, on
    first need (reading a vocabulary takes about a second: not at every worker's start)."""

    def __init__(self, make_tokenizer: Callable[[], Any], eos: list[int],
                 size: int = CACHE_SIZE) -> None:
        self.make_tokenizer = make_tokenizer
        self._tokenizer: Any = None
        self.eos = sorted(eos)
        self.cache = CompiledCache(self._compile, size)
        self.lock = threading.Lock()
        self.tokenizer_lock = threading.Lock()
        self.compile_lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """The llguidance tokenizer (made on first use)."""
        if self._tokenizer is None:
            with self.tokenizer_lock:
                if self._tokenizer is None:
                    self._tokenizer = self.make_tokenizer()
        return self._tokenizer

    @property
    def compiled(self) -> int:
        """How many constraints were compiled (the others came from the cache)."""
        return self.cache.compiled

    def compile(self, c: Constraint) -> Compiled:
        """The compiled constraint (cached); EngineError 40001 when it cannot be enforced. One
        compilation at a time: requests arriving together with a new schema compile it once."""
        with self.compile_lock:
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
            raise refused(f"the JSON schema cannot be enforced: {message(matcher.get_error())}")
        after = _after(c)
        trigger = (after.encode() if after
                   else c.open.rstrip().encode() if c.lazy and c.open.strip() else None)
        return Compiled(matcher, trigger)

    def guide(self, c: Constraint) -> Guide:
        """A request's matcher (its own copy of the compiled constraint)."""
        compiled = self.compile(c)
        with self.lock:  # one copy at a time of the shared start state
            matcher = compiled.matcher.deep_copy()
        return Guide(self, matcher, compiled.trigger)


class DeadEnd(EngineError):
    """The constraint allows no next token: the constrained text cannot go on."""

    def __init__(self) -> None:
        super().__init__("the output constraint allows no next token (the grammar made from the "
                         "schema dead-ends here, or the request's logit_bias rules out all it "
                         "allows); the answer was ended")


class Guide:
    """One request's constraint state: feed it the tokens generated (`feed`), ask it what may
    come next (`allows` one token, `allowed` the whole vocabulary)."""

    def __init__(self, grammars: Grammars, matcher: Any, trigger: bytes | None) -> None:
        import llguidance.numpy

        self.grammars = grammars
        self.matcher = matcher
        self.trigger = trigger  # lazy: the opening marker not seen yet
        self.text = bytearray()  # lazy: the text generated before the marker
        self.mask = llguidance.numpy.allocate_token_bitmask(1, grammars.tokenizer.vocab_size)
        self.fill = llguidance.numpy.fill_next_token_bitmask

    @property
    def active(self) -> bool:
        """Whether the constraint applies to the next token (a lazy one: once its marker came)."""
        return self.trigger is None

    def feed(self, tokens: list[int]) -> None:
        """The tokens generated (or replayed) since the last call, in order."""
        if not tokens:
            return
        if self.trigger is not None:
            self._watch(tokens)
            return
        for t in tokens:
            if self.matcher.is_stopped():  # done: what follows is the end token
                return
            if not self.matcher.consume_token(t):
                log.info("constrained generation: %s", message(self.matcher.get_error()))
                return

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (one token checked: cheap)."""
        if self.trigger is not None:
            return True
        if self.matcher.is_stopped():
            return token in self.grammars.eos
        return bool(self.matcher.validate_tokens([token]) == 1)

    def allowed(self, width: int) -> np.ndarray:
        """Which of the first `width` token ids may come next (bool per token; false past the
        tokenizer's vocabulary): the end tokens alone once the matcher is done or broken."""
        if self.trigger is not None:
            return np.ones(width, dtype=bool)
        if self.matcher.is_stopped():
            out = np.zeros(width, dtype=bool)
            out[[t for t in self.grammars.eos if t < width]] = True
            return out
        self.fill(self.matcher, self.mask)
        bits = np.unpackbits(self.mask.view(np.uint8), bitorder="little").view(bool)
        if bits.size < width:
            return np.concatenate([bits, np.zeros(width - bits.size, dtype=bool)])
        return bits[:width]

    def _watch(self, new: list[int]) -> None:
        """Lazy: watch the text for the opening marker; once there, start the matcher on the
        text from the marker on."""
        assert self.trigger is not None
        start = max(0, len(self.text) - len(self.trigger) + 1)
        self.text += self.grammars.tokenizer.decode_bytes(new)
        at = self.text.find(self.trigger, start)
        if at < 0:
            return
        tail = bytes(self.text[at:])
        self.trigger, self.text = None, bytearray()
        tokens = self.grammars.tokenizer.tokenize_bytes(tail)
        if not self.matcher.consume_tokens(tokens):
            log.info("constrained generation: the text after the opening marker breaks the "
                     "constraint (%s); only an end token is left",
                     message(self.matcher.get_error()))
