"""The tool-call parser under every way a stream can be cut (no servers).

Each recorded model output is fed whole (the non-streamed answer) and cut at every position into
two pieces, and into single characters: the joined content and each call's name and joined
arguments must be the same every time, the first delta of a call must carry its id and name, and
no call may have an empty name.
"""

from __future__ import annotations

import json

import pytest

from llmrelay.worker.toolcalls import ToolCallDelta, ToolCallParser

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
TRICKY = ('{"name": "search", "arguments": {"q": "a } { \\" ] [ \\\\", "n": [1, {"x": '
          '"</tool_call>"}], "ok": true}}')
UNICODE = '{"name": "traduire", "arguments": {"texte": "héllo ☃ 日本 🐉"}}'

RECORDED = {
    "one call": (f"<tool_call>\n{WEATHER}\n</tool_call>", "",
                 [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    "braces and quotes in strings": (f"<tool_call>{TRICKY}</tool_call>", "",
                                     [("search", json.dumps(json.loads(TRICKY)["arguments"])
                                       .replace('": ', '": '))]),
    "unicode": (f"<tool_call>\n{UNICODE}\n</tool_call>\n", "",
                [("traduire", '{"texte": "héllo ☃ 日本 🐉"}')]),
    "several calls": (f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{UNICODE}\n"
                      "</tool_call>", "",
                      [("get_weather", '{"city": "Paris", "unit": "c"}'),
                       ("traduire", '{"texte": "héllo ☃ 日本 🐉"}')]),
    "text then a call": (f"Let me look that up.\n<tool_call>\n{WEATHER}\n</tool_call>",
                         "Let me look that up.", [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    "arguments before the name": ('<tool_call>{"arguments": {"a": [1, 2]}, "name": "f"}</tool_call>',
                                  "", [("f", '{"a": [1, 2]}')]),
    "a number as arguments": ('<tool_call>{"name": "n", "arguments": 42}</tool_call>', "",
                              [("n", "42")]),
    "not a call": ("<tool_call>oops</tool_call> and more", "<tool_call>oops</tool_call> and more",
                   []),
    "plain text with angle brackets": ("a < b, and <tool", "a < b, and <tool", []),
    "only spaces": ("  \n", "  \n", []),
    "cut short by the length limit": ('<tool_call>\n{"name": "f", "arguments": {"a": "xy',
                                      "", [("f", '{"a": "xy')]),
    "cut short before the name": ('Sure.\n<tool_call>\n{"na', "Sure.", []),
}


def parse(pieces: list[str], **options: bool) -> tuple[str, list[ToolCallDelta]]:
    parser = ToolCallParser(**options)
    content, deltas = "", []
    for p in pieces:
        c, d = parser.feed(p)
        content += c
        deltas += d
        if parser.repeated:  # the worker ends the generation there
            break
    c, d = parser.finish()
    return content + c, deltas + d


def calls_of(deltas: list[ToolCallDelta]) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id and d.id.startswith("call_") and d.name, f"first delta lacks id/name: {d}"
            calls[d.index] = [d.name, ""]
        else:
            assert d.id is None and d.name is None
        calls[d.index][1] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [(name, args) for name, args in (calls[i] for i in sorted(calls))]


@pytest.mark.parametrize("name", list(RECORDED))
def test_whole_and_every_cut_give_the_same_calls(name: str) -> None:
    text, content, calls = RECORDED[name]
    whole_content, whole = parse([text])
    assert whole_content == content
    assert calls_of(whole) == calls
    for cut in range(1, len(text)):
        got_content, got = parse([text[:cut], text[cut:]])
        assert (got_content, calls_of(got)) == (content, calls), f"cut at {cut}: {text[:cut]!r}"
    got_content, got = parse(list(text))
    assert (got_content, calls_of(got)) == (content, calls)


def test_arguments_stream_in_pieces_after_the_name() -> None:
    parser = ToolCallParser()
    text = f"<tool_call>\n{WEATHER}\n</tool_call>"
    seen = []
    for ch in text:
        seen += parser.feed(ch)[1]
    assert seen[0].name == "get_weather" and seen[0].arguments == ""
    assert len([d for d in seen if d.arguments]) > 5  # not one piece at the end
    assert json.loads("".join(d.arguments for d in seen)) == {"city": "Paris", "unit": "c"}


OTHER = '{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "c"}}'
SAME_REORDERED = '{"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}'
PARIS = ("get_weather", '{"city": "Paris", "unit": "c"}')
LYON = ("get_weather", '{"city": "Lyon", "unit": "c"}')
# (text, content, calls, the turn ended at a repeat); parsed with hold_repeats (parallel calls)
HELD = {
    "a repeated call ends the turn": (
        f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{SAME_REORDERED}\n</tool_call>\n"
        f"<tool_call>\n{WEATHER}\n</tool_call>", "", [PARIS], True),
    "different calls are all kept": (
        f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{OTHER}\n</tool_call>", "",
        [PARIS, LYON], False),
    "a repeat after two calls": (
        f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{OTHER}\n</tool_call>\n"
        f"<tool_call>\n{OTHER}\n</tool_call>", "", [PARIS, LYON], True),
    "a later call cut short is dropped": (
        f'<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{{"name": "get_weather", '
        '"arguments": {"ci', "", [PARIS], False),
    "the start of a further marker is no text": (
        f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool", "", [PARIS], False),
}


@pytest.mark.parametrize("name", list(HELD))
def test_calls_after_the_first_are_held_and_a_repeat_ends_the_turn(name: str) -> None:
    text, content, calls, repeated = HELD[name]
    for pieces in ([text], *([text[:cut], text[cut:]] for cut in range(1, len(text))), list(text)):
        parser = ToolCallParser(hold_repeats=True)
        got_content, got = "", []
        for p in pieces:
            c, d = parser.feed(p)
            got_content += c
            got += d
            if parser.repeated:
                break
        c, d = parser.finish()
        got_content, got = got_content + c, got + d
        assert (got_content, calls_of(got), parser.repeated) == (content, calls, repeated), pieces


@pytest.mark.parametrize("tail", ["\n<", "\n<tool", "\n<tool_call", " <tool_c"])
def test_a_cut_marker_after_calls_or_in_a_forced_call_is_never_text(tail: str) -> None:
    after_call = f"<tool_call>\n{WEATHER}\n</tool_call>{tail}"
    for pieces in ([after_call], list(after_call)):
        content, deltas = parse(pieces)
        assert (content, calls_of(deltas)) == ("", [PARIS])
    assert parse([tail.lstrip()], forced=True)[0] == ""
    assert parse(["Hello" + tail])[0] == "Hello" + tail  # free text may end with '<'
