"""The transformers engine's constraint and logit-bias processors, without a server or a model:
the bundled SmolLM2's tokenizer (read from its GGUF), llguidance, and score rows made here."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llguidance")

import torch  # noqa: E402

from llmrelay.worker.constraints import Constraint, for_tools  # noqa: E402
from llmrelay.worker.engines.base import EngineError  # noqa: E402
from llmrelay.worker.engines.guidance import Grammars, grammar_text  # noqa: E402
from llmrelay.worker.engines.hf.constraints import (  # noqa: E402
    Constrained,
    LogitBias,
    load_grammars,
)

N_VOCAB = 49152
EOS = 2  # <|im_end|>
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    from llmrelay.worker.models import resolve

    gguf = resolve("smollm2").path
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def grammars(tok: Any) -> Grammars:
    g = load_grammars(tok, N_VOCAB, [EOS])
    assert g is not None
    return g


def drive(proc: Any, tok: Any, n_prompt: int, text: str) -> list[int]:
    """Run `proc` as generate() would along `text`'s tokens; returns, per step, how many
    tokens were allowed (and checks the next token of `text` was one of them)."""
    target = tok.encode(text, add_special_tokens=False)
    ids = [7] * n_prompt
    allowed = []
    for t in [*target, EOS]:
        scores = proc(torch.tensor([ids]), torch.zeros(1, N_VOCAB))
        finite = torch.isfinite(scores[0])
        allowed.append(int(finite.sum()))
        assert finite[t], f"{tok.decode([t])!r} refused after {tok.decode(ids[n_prompt:])!r}"
        ids.append(t)
    return allowed


def test_a_schema_is_compiled_once_and_enforced_compactly(grammars: Grammars, tok: Any) -> None:
    c = Constraint(schema={"type": "object", "properties": {"n": {"type": "integer"}},
                           "required": ["n"]})
    before = grammars.compiled
    p = Constrained.of(grammars, c, 3)
    Constrained.of(grammars, Constraint(schema=dict(c.schema)), 3)  # same constraint: cached
    assert grammars.compiled == before + 1
    steps = drive(p, tok, 3, '{"n": 42}')
    assert steps[-1] == 1  # the object is complete: only the end token
    # compact JSON: ": " and nothing else after a key
    q = Constrained.of(grammars, c, 0)
    scores = q(torch.tensor([tok.encode('{"n"', add_special_tokens=False)]), torch.zeros(1, N_VOCAB))
    allowed = {tok.decode([t]) for t in torch.isfinite(scores[0]).nonzero().flatten().tolist()}
    assert allowed and all(":".startswith(a) or a.startswith(":") for a in allowed), allowed
    assert not any(a.startswith(": ") and len(a) > 2 and a[2] == " " for a in allowed)


def test_tool_calls_between_markers(grammars: Grammars, tok: Any) -> None:
    c = for_tools([WEATHER], "required", parallel=True)
    assert c is not None and not c.lazy
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    steps = drive(Constrained.of(grammars, c, 5), tok, 5, call + "\n" + call)
    assert steps[0] < 10  # it must open a call at once
    text = grammar_text(c)
    assert text.startswith("start: block") and "%json" in text and "{0,7}" in text


def test_lazy_constraint_starts_at_the_marker(grammars: Grammars, tok: Any) -> None:
    c = for_tools([WEATHER], "auto", parallel=False)
    assert c is not None and c.lazy
    p = Constrained.of(grammars, c, 2)
    free = "Let me check. "
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    steps = drive(p, tok, 2, free + call)
    n_free = len(tok.encode(free + "<tool_call>", add_special_tokens=False))
    assert min(steps[:n_free]) == N_VOCAB  # free text until the marker is complete
    assert max(steps[n_free:n_free + 3]) < 100 and steps[-1] == 1  # then the call's JSON
    # a marker that ends inside a token: the rest of that token is checked too
    q = Constrained.of(grammars, c, 0)
    ids = tok.encode("ok <tool_call>\n{", add_special_tokens=False)
    scores = q(torch.tensor([ids]), torch.zeros(1, N_VOCAB))
    allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).startswith('"') for t in allowed)


def test_alternative_answer_or_calls(grammars: Grammars, tok: Any) -> None:
    answer = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    c = for_tools([WEATHER], "auto", parallel=False, response_schema=answer)
    assert c is not None and c.alternative is not None
    drive(Constrained.of(grammars, c, 0), tok, 0, '{"ok": true}')
    drive(Constrained.of(grammars, c, 0), tok, 0,
          '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, "not"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "strange"}, "strange"),
    ("not a schema", "JSON object"),
])
def test_unenforceable_schemas_are_refused_naming_why(grammars: Grammars, schema: Any,
                                                      named: str) -> None:
    for c in (Constraint(schema=schema),
              Constraint(schema={"type": "object", "properties": {"a": schema}})
              if isinstance(schema, dict) else Constraint(schema=schema, open="<a>", close="</a>")):
        with pytest.raises(EngineError) as e:
            Constrained.of(grammars, c, 0)
        assert e.value.code == 40001 and named in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


def test_a_client_cannot_loosen_the_schema(grammars: Grammars) -> None:
    lenient = {"type": "object", "not": {"type": "string"}, "x-guidance": {"lenient": True}}
    with pytest.raises(EngineError, match="not"):
        Constrained.of(grammars, Constraint(schema=lenient), 0)


def test_a_dead_end_ends_with_an_error_and_a_possible_token(grammars: Grammars) -> None:
    p = Constrained.of(grammars, Constraint(schema={"type": "integer"}), 0)
    scores = torch.full((1, N_VOCAB), float("-inf"))  # nothing the grammar allows is possible
    out = p(torch.tensor([[1]])[:, :0], scores)
    assert p.error is not None and "allows no next token" in str(p.error)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]


def test_a_broken_matcher_allows_only_the_end(grammars: Grammars, tok: Any) -> None:
    p = Constrained.of(grammars, Constraint(schema={"type": "integer"}), 0)
    ids = tok.encode("hello", add_special_tokens=False)  # not an integer: the matcher fails
    out = p(torch.tensor([ids]), torch.zeros(1, N_VOCAB))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS] and p.error is None


def test_logit_bias() -> None:
    bias = LogitBias({5: 100.0, 9: -100.0}, N_VOCAB)
    out = bias(torch.tensor([[1]]), torch.zeros(1, N_VOCAB))
    assert out[0, 5] == 100 and out[0, 9] == -100 and out[0, 6] == 0
    with pytest.raises(EngineError, match="outside the vocabulary") as e:
        LogitBias({N_VOCAB: 1.0}, N_VOCAB)
    assert e.value.code == 40302


def test_grammar_text_is_valid_json_inside(grammars: Grammars) -> None:
    c = for_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, False)
    assert c is not None
    line = next(x for x in grammar_text(c).splitlines() if x.startswith("value: %json "))
    assert json.loads(line[len("value: %json "):])["x-guidance"]["whitespace_flexible"] is False


def test_objects_that_list_their_properties_get_only_those(grammars: Grammars, tok: Any) -> None:
    listed = {"type": "object", "properties": {"a": {"type": "integer"}}}
    after = tok.encode('{"a": 1', add_special_tokens=False)

    def allows_more(schema: dict[str, Any]) -> bool:
        scores = Constrained.of(grammars, Constraint(schema=schema), 0)(torch.tensor([after]),
                                                                   torch.zeros(1, N_VOCAB))
        return bool(torch.isfinite(scores[0, tok.encode(",", add_special_tokens=False)[0]]))

    assert not allows_more(listed)
    assert allows_more({**listed, "additionalProperties": True})
    assert allows_more({"allOf": [listed, {"properties": {"b": {"type": "string"}}}]})
