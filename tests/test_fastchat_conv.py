"""The FastChat conversation renderer against FastChat 0.2.36's own renderings.

tests/data/fastchat_conv_cases.json holds, for every built-in template of FastChat 0.2.36 (all
its separator styles), the template as `/worker_get_conv_template` sends it, some message
lists, and the prompt FastChat's code built from them (made by
`fastchat_env.make_conv_cases`, which runs the real FastChat).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmrelay.fastchat_conv import STYLES_0_2_36, Conversation, ConvTemplateError

CASES = json.loads((Path(__file__).parent / "data" / "fastchat_conv_cases.json").read_text())


def test_cases_cover_every_style_fastchat_uses() -> None:
    styles = {STYLES_0_2_36[c["conv"]["sep_style"] - 1] for c in CASES}
    assert {"ADD_COLON_SINGLE", "ADD_COLON_TWO", "NO_COLON_SINGLE", "CHATML", "LLAMA2",
            "ADD_NEW_LINE_SINGLE", "FALCON_CHAT", "DOLLY", "CHATGLM"} <= styles
    assert len(styles) == len(STYLES_0_2_36)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['conv']['name']}-{len(c['messages'])}")
def test_renders_like_fastchat(case: dict) -> None:
    conv = Conversation.from_wire(case["conv"])
    assert conv.render(case["messages"]) == case["prompt"]


def test_chatml_exact() -> None:
    conv = Conversation.from_wire({
        "name": "chatml", "system_template": "<|im_start|>system\n{system_message}",
        "system_message": "You are helpful.", "roles": ["<|im_start|>user", "<|im_start|>assistant"],
        "messages": [], "offset": 0, "sep_style": 9, "sep": "<|im_end|>", "sep2": None,
        "stop_str": "<|im_end|>", "stop_token_ids": [2]})
    assert conv.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert conv.stops(["END", "<|im_end|>"]) == ["END", "<|im_end|>"]
    assert conv.stop_token_ids == [2]


def test_llama3_by_name() -> None:
    conv = Conversation.from_wire({
        "name": "llama-3", "system_template":
        "<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
        "roles": ["user", "assistant"], "sep_style": "LLAMA3", "sep": "", "stop_str": "<|eot_id|>"})
    assert conv.render([{"role": "system", "content": "S"}, {"role": "user", "content": " Hi "}]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_content_parts_are_joined() -> None:
    conv = Conversation.from_wire({"sep_style": 1, "roles": ["U", "A"], "sep": "\n"})
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert conv.render(msgs) == "\nU: a\nb\nA:"


@pytest.mark.parametrize("bad", [{"sep_style": 0}, {"sep_style": 99}, {"sep_style": "NOPE"},
                                 {"sep_style": 1, "roles": ["only one"]}, "not an object"])
def test_unusable_templates_are_refused(bad: object) -> None:
    with pytest.raises(ConvTemplateError):
        Conversation.from_wire(bad)  # type: ignore[arg-type]


def test_unknown_role_is_refused() -> None:
    conv = Conversation.from_wire({"sep_style": 9, "roles": ["u", "a"]})
    with pytest.raises(ConvTemplateError, match="tool"):
        conv.render([{"role": "tool", "content": "x"}])
