"""The reasoning parser and the format detection, without a model: each recorded output is fed
whole, cut at every position into two pieces, and one character at a time; the reasoning and
the answer must be the same every time."""

from __future__ import annotations

import pytest

from llmrelay.worker.reasoning import FORMATS, ReasoningParser, choose, detect

R1, QWEN, OSS = FORMATS["deepseek_r1"], FORMATS["qwen3"], FORMATS["gpt_oss"]

CASES = {
    "r1: opened by the template": (R1, "Let me think.\n2+2 is 4.\n</think>\n\nThe answer is 4.",
                                   "Let me think.\n2+2 is 4.\n", "The answer is 4."),
    "r1: the model opens it again": (R1, "<think>\nHmm.</think>Four.", "Hmm.", "Four."),
    "r1: never closed (length)": (R1, "Still thinking about <b>", "Still thinking about <b>", ""),
    "r1: cut inside the closing tag": (R1, "Thinking</thi", "Thinking</thi", ""),
    "qwen3: a think block": (QWEN, "<think>\nplan\n</think>\n\nHello!", "plan\n", "Hello!"),
    "qwen3: no block": (QWEN, "Hello <think> there", "", "Hello <think> there"),
    "qwen3: empty block (thinking off)": (QWEN, "<think>\n\n</think>\n\nHi.", "", "Hi."),
    "r1: closed at once (budget 0)": (R1, "\n</think>\n\nHi.", "", "Hi."),
    "qwen3: leading spaces": (QWEN, "  <think>x</think>y", "x", "y"),
    "qwen3: only the start of a marker": (QWEN, "<thi", "", "<thi"),
    "answer keeps its tool call": (R1, "plan</think>\n<tool_call>\n{}\n</tool_call>", "plan",
                                   "<tool_call>\n{}\n</tool_call>"),
    "gpt-oss: channels": (OSS, "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant"
                               "<|channel|>final<|message|>Answer.", "Think.", "Answer."),
    "gpt-oss: final only": (OSS, "<|channel|>final<|message|>Hi", "", "<|channel|>final<|message|>Hi"),
}


def run(fmt, pieces):  # type: ignore[no-untyped-def]
    p = ReasoningParser(fmt)
    r = a = ""
    for piece in pieces:
        x, y = p.feed(piece)
        r, a = r + x, a + y
    x, y = p.finish()
    return r + x, a + y


@pytest.mark.parametrize("name", list(CASES))
def test_every_cut_gives_the_same_split(name: str) -> None:
    fmt, text, reasoning, answer = CASES[name]
    assert run(fmt, [text]) == (reasoning, answer)
    for cut in range(1, len(text)):
        assert run(fmt, [text[:cut], text[cut:]]) == (reasoning, answer), cut
    assert run(fmt, list(text)) == (reasoning, answer)


def test_in_reasoning_follows_the_block() -> None:
    p = ReasoningParser(R1)
    assert p.in_reasoning
    p.feed("a</think>b")
    assert not p.in_reasoning and p.closed
    q = ReasoningParser(QWEN)
    assert not q.in_reasoning
    q.feed("<think>x")
    assert q.in_reasoning


R1_TEMPLATE = ("{% for m in messages %}<｜{{ m['role'] }}｜>{{ m['content'] }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
QWEN_TEMPLATE = ("{%- if enable_thinking is defined and enable_thinking is false %}"
                 "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %} ... <think> ... </think>")


def test_detect_from_the_chat_template() -> None:
    assert detect(R1_TEMPLATE) == "deepseek_r1"
    assert detect(QWEN_TEMPLATE) == "qwen3"
    assert detect("<|start|>assistant<|channel|>analysis<|message|>") == "gpt_oss"
    assert detect("{{ messages }}") == "none" and detect(None) == "none"
    assert choose("auto", R1_TEMPLATE) is R1 and choose("none", R1_TEMPLATE) is None
    assert choose("qwen3", None) is QWEN
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        choose("o1", None)


def test_llamacpp_writes_special_tokens_only_for_a_format_whose_markers_are_special() -> None:
    """gpt-oss's channel markers are special tokens: the llama.cpp engine writes them as text for
    that format (or the parser would never see them), and for no other request."""
    from types import SimpleNamespace

    from llmrelay.worker.engines.llamacpp import Options, load
    from llmrelay.worker.models import resolve
    from llmrelay.worker.reasoning import Thinking

    engine = load(Options(resolve("smollm2").path, context_length=256, n_threads=1, parallel=1))
    try:
        (im_start,) = engine.tokenize("<|im_start|>", chat=True)  # a special token of SmolLM2's

        def gen(thinking: Thinking | None) -> SimpleNamespace:
            return SimpleNamespace(req=SimpleNamespace(thinking=thinking))

        assert engine.piece(gen(Thinking(OSS)), im_start) == b"<|im_start|>"  # type: ignore[arg-type]
        assert engine.piece(gen(Thinking(R1)), im_start) == b""  # type: ignore[arg-type]
        assert engine.piece(gen(None), im_start) == b""  # type: ignore[arg-type]
    finally:
        engine.close()
