"""Fast pure-Python unit tests: no servers, no subprocesses, no model loading.

Covers the registry, dispatch policies, stop-string matching, chat templates, model path
resolution, stack-file loading, OpenAI message normalization and the worker frame parser.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmrelay import launcher
from llmrelay.api.chat.protocol import ChatMessage, normalize_messages
from llmrelay.api.errors import APIError
from llmrelay.controller import registry as registry_mod
from llmrelay.controller.registry import Registry
from llmrelay.dispatch import lottery, pick, shortest_queue
from llmrelay.launcher import StackError, load_stack
from llmrelay.protocol import EXPIRY_BEATS, dumps, frame, iter_frame_batches, loads
from llmrelay.security import token_from
from llmrelay.stackstate import StackState, read_token, stack_key, state_dir
from llmrelay.worker.engines.base import StopMatcher
from llmrelay.worker.models import BUNDLED, ModelNotFound, resolve
from llmrelay.worker.templates import KNOWN, ChatTemplateError, choose

# --------------------------------------------------------------------------------------------
# 1. Registry
# --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


# A status with our extensions section: the worker is one of ours, so our expiry applies
# (a FastChat worker gets FastChat's longer expiry).
OURS = {"llmrelay": {"extensions": ["messages", "delta"]}}


def status(models: list[str], speed: float = 1, queue: int = 0, ours: bool = True) -> dict:
    s = {"model_names": models, "speed": speed, "queue_length": queue}
    if ours:
        s.update(OURS)
    return s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reg(clock: FakeClock) -> Registry:
    return Registry(heartbeat_interval=2.0, clock=clock)


def test_registry_expiration_is_three_heartbeat_intervals(reg: Registry) -> None:
    assert EXPIRY_BEATS == 3
    assert reg.expiration == pytest.approx(6.0)


def test_registry_register_stores_status_fields(reg: Registry, clock: FakeClock) -> None:
    info = reg.register("http://w1", status(["a", "b"], speed=2.5, queue=3))
    assert reg.workers["http://w1"] is info
    assert info.model_names == ["a", "b"]
    assert info.speed == 2.5
    assert info.queue_length == 3
    assert info.last_heart_beat == clock.t
    assert info.registered_at == clock.t
    assert not info.is_fastchat


def test_registry_expires_after_three_intervals(reg: Registry, clock: FakeClock) -> None:
    reg.register("http://w1", status(["a"]))
    clock.advance(5.9)
    assert reg.expire() == []
    assert "http://w1" in reg.workers
    clock.advance(0.2)  # 6.1 s of silence > 3 * 2 s
    assert reg.expire() == ["http://w1"]
    assert reg.workers == {}


def test_registry_heartbeat_keeps_worker_alive(reg: Registry, clock: FakeClock) -> None:
    reg.register("http://w1", status(["a"]))
    for _ in range(10):
        clock.advance(4.0)  # each gap is under the 6 s expiration
        assert reg.heartbeat("http://w1", queue_length=7) is True
        assert reg.expire() == []
    assert reg.workers["http://w1"].queue_length == 7
    assert reg.workers["http://w1"].last_heart_beat == clock.t
    clock.advance(6.5)
    assert reg.expire() == ["http://w1"]


def test_registry_heartbeat_merges_status(reg: Registry) -> None:
    reg.register("http://w1", status(["a"]))
    assert reg.heartbeat("http://w1", 1, {"extra": 42})
    assert reg.workers["http://w1"].status["extra"] == 42
    assert reg.workers["http://w1"].status["model_names"] == ["a"]


def test_registry_no_heartbeat_check_never_expires(reg: Registry, clock: FakeClock) -> None:
    reg.register("http://static", status(["a"]), check_heart_beat=False)
    reg.register("http://normal", status(["a"]))
    clock.advance(10_000)
    assert reg.expire() == ["http://normal"]
    assert list(reg.workers) == ["http://static"]


def test_registry_fastchat_worker_gets_fastchat_expiry(reg: Registry, clock: FakeClock) -> None:
    reg.register("http://fc", status(["a"], ours=False))
    assert reg.workers["http://fc"].is_fastchat
    limit = max(reg.expiration, registry_mod.FASTCHAT_EXPIRATION)
    clock.advance(limit - 0.5)
    assert reg.expire() == []
    clock.advance(1.0)
    assert reg.expire() == ["http://fc"]


def test_registry_heartbeat_unknown_worker_returns_false(reg: Registry) -> None:
    assert reg.heartbeat("http://nobody", 0) is False
    assert reg.workers == {}
    assert reg.version == 0


def test_registry_reregister_replaces(reg: Registry, clock: FakeClock) -> None:
    reg.register("http://w1", status(["a"], speed=1, queue=5), multimodal=True)
    clock.advance(3)
    reg.register("http://w1", status(["b"], speed=4, queue=0))
    assert len(reg.workers) == 1
    w = reg.workers["http://w1"]
    assert w.model_names == ["b"]
    assert w.speed == 4
    assert w.queue_length == 0
    assert w.multimodal is False
    assert w.registered_at == clock.t
    assert reg.list_models() == ["b"]


def test_registry_list_models_sorted_union_and_multimodal_filter(reg: Registry) -> None:
    reg.register("http://w1", status(["zeta", "alpha"]))
    reg.register("http://w2", status(["alpha", "mid"]))
    reg.register("http://w3", status(["vision"]), multimodal=True)
    assert reg.list_models() == ["alpha", "mid", "vision", "zeta"]
    assert reg.list_models(multimodal=True) == ["vision"]
    assert reg.list_models(multimodal=False) == ["alpha", "mid", "zeta"]
    assert sorted(w.name for w in reg.workers_for("alpha")) == ["http://w1", "http://w2"]
    assert reg.workers_for("nothing") == []


def test_registry_version_bumps_on_membership_changes(reg: Registry, clock: FakeClock) -> None:
    v0 = reg.version
    reg.register("http://w1", status(["a"]))
    assert reg.version == v0 + 1
    reg.register("http://w2", status(["a"]))
    assert reg.version == v0 + 2
    reg.register("http://w1", status(["b"]))  # replacement counts as a change
    assert reg.version == v0 + 3
    reg.heartbeat("http://w1", 3)  # a heartbeat does not
    assert reg.version == v0 + 3
    assert reg.remove("http://w2") is True
    assert reg.version == v0 + 4
    assert reg.remove("http://w2") is False  # nothing removed, no bump
    assert reg.version == v0 + 4
    clock.advance(100)
    assert reg.expire() == ["http://w1"]
    assert reg.version == v0 + 5
    assert reg.expire() == []
    assert reg.version == v0 + 5


def test_registry_table_shape(reg: Registry, clock: FakeClock) -> None:
    reg.register("http://w1", status(["a"], speed=2, queue=1))
    t = reg.table()
    assert set(t) == {"version", "heartbeat_interval", "expiration", "now", "warming_up", "workers"}
    assert t["version"] == 1
    assert t["heartbeat_interval"] == 2.0
    assert t["expiration"] == pytest.approx(6.0)
    assert t["now"] == clock.t
    assert t["warming_up"] is True
    assert isinstance(t["workers"], list) and len(t["workers"]) == 1
    w = t["workers"][0]
    assert w["name"] == "http://w1"
    assert w["model_names"] == ["a"]
    assert w["speed"] == 2.0
    assert w["queue_length"] == 1
    assert w["check_heart_beat"] is True
    assert w["multimodal"] is False
    assert w["status"]["llmrelay"] == OURS["llmrelay"]
    json.dumps(t)  # the table travels as JSON
    clock.advance(7)
    assert reg.table()["warming_up"] is False


# --------------------------------------------------------------------------------------------
# 2. Dispatch
# --------------------------------------------------------------------------------------------


@dataclass
class W:
    name: str
    speed: float = 1.0
    queue_length: int = 0


def test_lottery_proportional_to_speed() -> None:
    ws = [W("slow", 1), W("fast", 3), W("mid", 2)]
    rng = random.Random(1234)
    n = 6000
    counts = Counter(lottery(ws, rng).name for _ in range(n))
    assert set(counts) == {"slow", "fast", "mid"}
    assert 0.12 < counts["slow"] / n < 0.22  # expected 1/6
    assert 0.42 < counts["fast"] / n < 0.58  # expected 1/2
    assert 0.27 < counts["mid"] / n < 0.40  # expected 1/3
    assert counts["fast"] > counts["mid"] > counts["slow"]


def test_lottery_never_picks_zero_speed() -> None:
    ws = [W("dead", 0), W("alive", 1), W("negative", -5)]
    rng = random.Random(7)
    assert {lottery(ws, rng).name for _ in range(500)} == {"alive"}


def test_lottery_none_when_all_speeds_zero() -> None:
    assert lottery([W("a", 0), W("b", 0)], random.Random(0)) is None
    assert lottery([], random.Random(0)) is None


def test_shortest_queue_picks_least_queue_over_speed() -> None:
    # scores: a 4/1 = 4, b 6/3 = 2, c 3/1 = 3
    ws = [W("a", 1, 4), W("b", 3, 6), W("c", 1, 3)]
    rng = random.Random(0)
    for _ in range(50):
        assert shortest_queue(ws, rng).name == "b"


def test_shortest_queue_breaks_ties_at_random() -> None:
    ws = [W("a", 1, 2), W("b", 2, 4), W("c", 1, 5)]  # a and b tie at 2
    rng = random.Random(42)
    counts = Counter(shortest_queue(ws, rng).name for _ in range(400))
    assert set(counts) == {"a", "b"}
    assert counts["a"] > 100 and counts["b"] > 100


def test_shortest_queue_skips_zero_speed() -> None:
    ws = [W("idle-but-dead", 0, 0), W("busy", 1, 10)]
    rng = random.Random(0)
    for _ in range(20):
        assert shortest_queue(ws, rng).name == "busy"
    assert shortest_queue([W("x", 0, 0)], rng) is None
    assert shortest_queue([], rng) is None


def test_shortest_queue_honours_extra_load() -> None:
    ws = [W("a", 1, 0), W("b", 1, 1)]
    rng = random.Random(0)
    assert shortest_queue(ws, rng).name == "a"
    assert shortest_queue(ws, rng, extra_load={"a": 2}).name == "b"
    assert shortest_queue(ws, rng, extra_load={"b": 5}).name == "a"


def test_pick_dispatches_by_name() -> None:
    ws = [W("a", 1, 9), W("b", 1, 0)]
    rng = random.Random(3)
    assert pick("shortest_queue", ws, rng).name == "b"
    assert pick("shortest_queue", ws, rng, extra_load={"b": 20}).name == "a"
    assert pick("lottery", [W("z", 0), W("only", 1)], rng).name == "only"
    assert pick("lottery", [W("z", 0)], rng) is None


def test_pick_unknown_method_raises() -> None:
    with pytest.raises(ValueError, match="unknown dispatch method 'fastest'") as exc:
        pick("fastest", [W("a")])
    assert "shortest_queue" in str(exc.value) and "lottery" in str(exc.value)


# --------------------------------------------------------------------------------------------
# 3. StopMatcher
# --------------------------------------------------------------------------------------------


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    """Feed pieces until a stop is hit; returns (released per feed, hit, flushed)."""
    m = StopMatcher(stops)
    released = []
    hit = False
    for p in pieces:
        out, hit = m.feed(p)
        released.append(out)
        if hit:
            break
    return released, hit, m.flush()


def test_stop_matcher_no_stops_releases_everything() -> None:
    released, hit, rest = run_matcher([], ["Hello", " world"])
    assert released == ["Hello", " world"] and not hit and rest == ""


def test_stop_matcher_cuts_at_stop_in_one_feed() -> None:
    released, hit, rest = run_matcher(["STOP"], ["abcSTOPdef"])
    assert released == ["abc"] and hit and rest == ""


def test_stop_matcher_stop_split_across_feeds() -> None:
    released, hit, rest = run_matcher(["<|end|>"], ["Hello <", "|e", "nd", "|> tail"])
    assert hit
    assert "".join(released) == "Hello "
    assert rest == ""
    for piece in released:
        assert "<" not in piece


def test_stop_matcher_char_by_char() -> None:
    text = "The answer is 42.\nUser: more"
    released, hit, rest = run_matcher(["\nUser:"], list(text))
    assert hit
    assert "".join(released) + rest == "The answer is 42."


def test_stop_matcher_never_releases_partial_prefix() -> None:
    m = StopMatcher(["<end>"])
    out, hit = m.feed("abc<en")
    assert (out, hit) == ("abc", False)
    out, hit = m.feed("")
    assert out == "" and not hit
    out, hit = m.feed("d")  # "<end" still a prefix
    assert (out, hit) == ("", False)


def test_stop_matcher_releases_held_text_when_prefix_breaks() -> None:
    m = StopMatcher(["<end>"])
    assert m.feed("abc<en") == ("abc", False)
    out, hit = m.feed("x more")
    assert not hit
    assert out == "<enx more"


def test_stop_matcher_flush_releases_held_text() -> None:
    m = StopMatcher(["###"])
    out, hit = m.feed("result ##")
    assert (out, hit) == ("result ", False)
    assert m.flush() == "##"
    assert m.flush() == ""


def test_stop_matcher_ignores_empty_stop_strings() -> None:
    m = StopMatcher(["", "END"])
    assert m.stops == ["END"]
    out, hit = m.feed("hello")
    assert (out, hit) == ("hello", False)
    out, hit = m.feed(" and END")
    assert (out, hit) == (" and ", True)


def test_stop_matcher_only_empty_stops_never_stop() -> None:
    m = StopMatcher([""])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_stop_matcher_multiple_stops_pick_earliest() -> None:
    m = StopMatcher(["world", "lo"])
    out, hit = m.feed("hello world")
    assert (out, hit) == ("hel", True)


def test_stop_matcher_multiple_stops_earliest_across_feeds() -> None:
    released, hit, rest = run_matcher(["BBBB", "CC"], ["xxBB", "BCC", "B"])
    # "BBB" then "CC" arrive: "BBBB" is not complete, "CC" is, at index 5.
    assert hit
    assert "".join(released) + rest == "xxBBB"


def test_stop_matcher_repeated_prefix_chars() -> None:
    released, hit, rest = run_matcher(["aab"], list("xaaab!"))
    assert hit
    assert "".join(released) + rest == "xa"


def test_stop_matcher_flush_after_stop_is_empty() -> None:
    m = StopMatcher(["."])
    assert m.feed("one. two") == ("one", True)
    assert m.flush() == ""


# --------------------------------------------------------------------------------------------
# 4. Chat templates
# --------------------------------------------------------------------------------------------

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Again"},
]


def test_template_chatml_renders() -> None:
    t = choose(None, "chatml", None)
    assert t.name == "chatml"
    assert t.stop == ["<|im_end|>"]
    assert t.render(CONVO) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_add_generation_prompt_false() -> None:
    t = choose(None, "chatml", None)
    out = t.render(CONVO[:2], add_generation_prompt=False)
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_template_gemma_folds_system_and_uses_model_role() -> None:
    t = choose(None, "gemma", None, bos_token="<bos>")
    assert t.stop == ["<end_of_turn>"]
    out = t.render(CONVO)
    assert out == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nAgain<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "system" not in out and "assistant" not in out


def test_template_plain_renders() -> None:
    t = choose(None, "plain", None)
    assert t.render(CONVO[:3]) == "System: Be brief.\nUser: Hi\nAssistant: Hello\nAssistant:"
    assert "\nUser:" in t.stop


def test_template_from_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}[assistant]{% endif %}")
    t = choose("{{ 'own template' }}", str(path), "gemma3")
    assert t.name == str(path)
    assert t.render(CONVO[1:3]) == "[user]Hi[assistant]Hello[assistant]"


def test_template_unknown_name_raises_with_known_names(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jinja")
    with pytest.raises(ValueError) as exc:
        choose(None, missing, None)
    msg = str(exc.value)
    assert "nope.jinja" in msg
    for name in KNOWN:
        assert name in msg
    with pytest.raises(ValueError, match="chatml"):
        choose(None, "not-a-template-name", None)


def test_template_model_own_wins_without_request() -> None:
    own = "OWN:{% for m in messages %}{{ m['content'] }};{% endfor %}"
    t = choose(own, None, "gemma3")
    assert t.name == "model"
    assert t.render(CONVO[1:2]) == "OWN:Hi;"


def test_template_request_beats_own() -> None:
    t = choose("OWN", "chatml", None)
    assert t.name == "chatml"
    assert not t.render(CONVO[1:2]).startswith("OWN")


def test_template_by_architecture() -> None:
    assert choose(None, None, "gemma3").name == "gemma"
    assert choose(None, None, "Gemma3").name == "gemma"
    assert choose(None, None, "some-new-arch").name == "chatml"
    assert choose(None, None, None).name == "chatml"
    assert choose("", None, "llama").name == "chatml"  # an empty own template is no template


def test_template_raise_exception() -> None:
    own = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
           "supported') }}{% endif %}ok")
    t = choose(own, None, None)
    assert t.render(CONVO[1:2]) == "ok"
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        t.render(CONVO)


def test_template_syntax_error_becomes_chat_template_error() -> None:
    t = choose("{% for m in messages %}unterminated", None, None)
    with pytest.raises(ChatTemplateError, match="model"):
        t.render(CONVO)


def test_template_sandbox_refuses_unsafe_attributes() -> None:
    t = choose("{{ ''.__class__.__mro__ }}", None, None)
    try:
        out = t.render(CONVO)
    except ChatTemplateError:
        return
    assert "class" not in out and "object" not in out


def test_template_sandbox_refuses_subclasses_walk() -> None:
    t = choose("{{ ().__class__.__base__.__subclasses__() }}", None, None)
    try:
        out = t.render(CONVO)
    except ChatTemplateError:
        return
    assert "class" not in out


def test_template_sandbox_is_immutable() -> None:
    t = choose("{% set x = [] %}{{ x.append(1) }}{{ x }}", None, None)
    try:
        out = t.render(CONVO)
    except ChatTemplateError:
        return
    assert "[1]" not in out


# --------------------------------------------------------------------------------------------
# 5. Model resolution
# --------------------------------------------------------------------------------------------


def test_resolve_missing_path_mentions_aliases(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as exc:
        resolve(str(tmp_path / "no-such-model.gguf"))
    msg = str(exc.value)
    assert "does not exist" in msg
    for alias in BUNDLED:
        assert alias in msg


def test_resolve_non_gguf_file_raises(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFound, match="not a .gguf"):
        resolve(str(f))


def test_resolve_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "My Model.Q4.gguf"
    f.write_bytes(b"GGUF")
    r = resolve(str(f))
    assert r.kind == "gguf"
    assert r.path == f
    assert r.default_name == "My-Model.Q4"
    assert r.alias is None


def test_resolve_hf_folder(tmp_path: Path) -> None:
    d = tmp_path / "tiny-hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    r = resolve(str(d))
    assert r.kind == "hf"
    assert r.path == d
    assert r.default_name == "tiny-hf"


def test_resolve_folder_with_one_gguf(tmp_path: Path) -> None:
    d = tmp_path / "packed"
    d.mkdir()
    (d / "m.gguf").write_bytes(b"GGUF")
    r = resolve(str(d))
    assert r.kind == "gguf"
    assert r.path == d / "m.gguf"
    assert r.default_name == "packed"


def test_resolve_folder_with_nothing_raises(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve(str(d))
    (d / "a.gguf").write_bytes(b"")
    (d / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFound, match="exactly one"):
        resolve(str(d))


def test_resolve_smollm2_alias() -> None:
    r = resolve("smollm2")
    assert r.kind == "gguf"
    assert r.alias == "smollm2"
    assert r.default_name == "smollm2-135m-instruct"
    assert r.path.is_file()
    assert r.path.suffix == ".gguf"
    assert r.path.stat().st_size > 1_000_000
    assert resolve("SmolLM2").path == r.path  # aliases are case-insensitive


# --------------------------------------------------------------------------------------------
# 6. Stack files
# --------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_stack(tmp_path: Path, text: str) -> str:
    p = tmp_path / "stack.toml"
    p.write_text(text)
    return str(p)


def base_sections(c_port: int, a_port: int) -> str:
    return f"[controller]\nport = {c_port}\n\n[api]\nport = {a_port}\n\n"


def test_stack_unknown_section(tmp_path: Path) -> None:
    c, a = free_ports(2)
    path = write_stack(tmp_path, base_sections(c, a) + "[wrker]\nmodel_path = 'x'\n")
    with pytest.raises(StackError, match="unknown section 'wrker'"):
        load_stack(path, str(tmp_path / "logs"))


def test_stack_unknown_worker_setting(tmp_path: Path) -> None:
    c, a, w = free_ports(3)
    path = write_stack(tmp_path, base_sections(c, a)
                       + f"[[worker]]\nmodel_path = 'smollm2'\nport = {w}\nbogus_flag = 1\n")
    with pytest.raises(StackError, match=r"\[\[worker\]\] #1: unknown setting 'bogus_flag'"):
        load_stack(path, str(tmp_path / "logs"))


def test_stack_abbreviated_worker_setting_is_unknown(tmp_path: Path) -> None:
    c, a, w = free_ports(3)
    path = write_stack(tmp_path, base_sections(c, a)
                       + f"[[worker]]\nmodel_path = 'smollm2'\nport = {w}\nn_thread = 1\n")
    with pytest.raises(StackError, match="n_thread"):
        load_stack(path, str(tmp_path / "logs"))


def test_stack_bad_setting_value(tmp_path: Path) -> None:
    c, a = free_ports(2)
    path = write_stack(tmp_path, base_sections(c, a) + "[[worker]]\nport = 'abc'\n")
    with pytest.raises(StackError, match="port"):
        load_stack(path, str(tmp_path / "logs"))


def test_stack_worker_port_used_twice(tmp_path: Path) -> None:
    c, a, w = free_ports(3)
    path = write_stack(tmp_path, base_sections(c, a)
                       + f"[[worker]]\nmodel_path = 'smollm2'\nport = {w}\n\n"
                       + f"[[worker]]\nmodel_path = 'gemma3-270m'\nport = {w}\n")
    with pytest.raises(StackError, match=rf"#2: port {w} is used twice"):
        load_stack(path, str(tmp_path / "logs"))


def test_stack_worker_port_same_as_controller(tmp_path: Path) -> None:
    c, a = free_ports(2)
    path = write_stack(tmp_path, base_sections(c, a) + f"[[worker]]\nport = {c}\n")
    with pytest.raises(StackError, match=f"port {c} is used twice"):
        load_stack(path, str(tmp_path / "logs"))


def test_stack_invalid_toml(tmp_path: Path) -> None:
    path = write_stack(tmp_path, "[controller\nport = = 3\n")
    with pytest.raises(StackError, match="not valid TOML"):
        load_stack(path, str(tmp_path / "logs"))


def test_stack_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(StackError, match="does not exist") as exc:
        load_stack(str(missing), None)
    assert "absent.toml" in str(exc.value)


def test_stack_without_workers(tmp_path: Path) -> None:
    c, a = free_ports(2)
    path = write_stack(tmp_path, base_sections(c, a))
    with pytest.raises(StackError, match=r"no \[\[worker\]\]"):
        load_stack(path, str(tmp_path / "logs"))


def test_stack_port_held_by_another_program(tmp_path: Path) -> None:
    a, w = free_ports(2)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        c = holder.getsockname()[1]
        path = write_stack(tmp_path, base_sections(c, a) + f"[[worker]]\nport = {w}\n")
        with pytest.raises(StackError, match=rf"controller: cannot listen on 127.0.0.1:{c}"):
            load_stack(path, str(tmp_path / "logs"))


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_stack_valid_with_explicit_ports_and_lists(tmp_path: Path) -> None:
    c, a, w1, w2 = free_ports(4)
    path = write_stack(tmp_path, base_sections(c, a) + f"""
[[worker]]
model_path = "smollm2"
model_names = ["smol", "smol-alias"]
port = {w1}

[[worker]]
model-path = "gemma3-270m"
port = {w2}
no_register = false
""")
    stack, logs = load_stack(path, str(tmp_path / "mylogs"))
    assert logs == tmp_path / "mylogs"
    assert stack.controller_url == f"http://127.0.0.1:{c}"
    assert stack.api_url == f"http://127.0.0.1:{a}"
    assert stack.worker_urls == [f"http://127.0.0.1:{w1}", f"http://127.0.0.1:{w2}"]
    w_a, w_b = stack.workers
    assert _flag(w_a.argv, "--model-names") == "smol,smol-alias"
    assert w_a.name == "worker-smol"
    assert w_b.name == "worker-gemma3-270m"
    assert "--no-register" not in w_b.argv  # false booleans are left out
    assert _flag(w_a.argv, "--controller-address") == stack.controller_url
    assert w_a.log_path == tmp_path / "mylogs" / "worker-smol.log"
    assert stack.api.log_path == tmp_path / "mylogs" / "api.log"
    # The registration token travels in the environment, never in argv.
    assert stack.token
    for child in [stack.controller, stack.api, *stack.workers]:
        assert stack.token not in child.argv
        assert child.env.get("LLMRELAY_REGISTRATION_TOKEN") == stack.token


def test_stack_two_workers_auto_ports_and_names(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Auto-assigned worker ports start at 21002, which another test run may hold: this test
    # checks the assignment, not the machine, so the free-port check is stubbed out here.
    checked: list[tuple[str, int]] = []
    monkeypatch.setattr(launcher, "_check_port",
                        lambda name, host, port: checked.append((name, port)))
    c, a = free_ports(2)
    path = write_stack(tmp_path, base_sections(c, a) + """
[[worker]]
model_path = "smollm2"
model_names = "smol"

[[worker]]
model_path = "smollm2"
model_names = "smol"
""")
    stack, _ = load_stack(path, str(tmp_path / "logs"))
    ports = [int(_flag(w.argv, "--port")) for w in stack.workers]
    assert len(set(ports)) == 2
    assert not set(ports) & {c, a}
    assert [w.name for w in stack.workers] == ["worker-smol", "worker-smol-2"]
    assert stack.worker_urls == [f"http://127.0.0.1:{p}" for p in ports]
    assert {p for _, p in checked} == {c, a, *ports}


def test_stack_auto_port_skips_controller_port(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "_check_port", lambda name, host, port: None)
    a = free_ports(1)[0]
    path = write_stack(tmp_path, f"[controller]\nport = 21002\n\n[api]\nport = {a}\n\n"
                                 "[[worker]]\nmodel_path = 'smollm2'\n")
    stack, _ = load_stack(path, str(tmp_path / "logs"))
    assert int(_flag(stack.workers[0].argv, "--port")) != 21002


def test_stack_api_keys_go_to_env(tmp_path: Path) -> None:
    c, a, w = free_ports(3)
    path = write_stack(tmp_path, f"[controller]\nport = {c}\n\n[api]\nport = {a}\n"
                                 f"api_keys = ['k1', 'k2']\n\n[[worker]]\nport = {w}\n")
    stack, _ = load_stack(path, str(tmp_path / "logs"))
    assert stack.api.env["LLMRELAY_API_KEYS"] == "k1,k2"
    assert "k1" not in " ".join(stack.api.argv)


def test_stack_key_spellings_of_one_loopback_controller_share_a_key() -> None:
    keys = {stack_key(u) for u in ("http://127.0.0.1:21001", "http://localhost:21001/",
                                   "127.0.0.1:21001", "http://[::1]:21001",
                                   "http://localhost:21001,http://other:21001")}
    assert keys == {"127.0.0.1-21001"}
    assert stack_key("http://gpu-box.lan:21001") == "gpu-box.lan-21001"


def test_state_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLMRELAY_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "llmrelay"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state_dir() == tmp_path / ".local" / "state" / "llmrelay"
    monkeypatch.setenv("LLMRELAY_STATE_DIR", str(tmp_path / "mine"))
    assert state_dir() == tmp_path / "mine"


def test_token_file_private_found_by_address_flag_and_env_win(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMRELAY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("LLMRELAY_REGISTRATION_TOKEN", raising=False)
    state = StackState("http://127.0.0.1:23456")
    path = state.begin("s3cret")
    assert path == tmp_path / "state" / "stacks" / "127.0.0.1-23456" / "token"
    for p, mode in [(path, 0o600), (path.parent, 0o700), (tmp_path / "state", 0o700)]:
        assert p.stat().st_mode & 0o777 == mode, p
    assert read_token("http://localhost:23456") == "s3cret"
    assert read_token("http://127.0.0.1:23457") is None
    assert token_from(None, "http://localhost:23456") == "s3cret"
    assert token_from("flag", "http://localhost:23456") == "flag"
    monkeypatch.setenv("LLMRELAY_REGISTRATION_TOKEN", "")  # explicitly none
    assert token_from(None, "http://localhost:23456") is None
    state.clear()
    assert not path.exists() and read_token("http://127.0.0.1:23456") is None


def test_token_of_an_up_that_is_gone_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("LLMRELAY_STATE_DIR", str(tmp_path))
    state = StackState("http://127.0.0.1:23456")
    state.begin("stale")
    record = json.loads(state.record_path.read_text())
    record["up_start"] = -1  # the pid now belongs to another process (or none)
    state.record_path.write_text(json.dumps(record))
    assert read_token("http://127.0.0.1:23456") is None


# --------------------------------------------------------------------------------------------
# 7. normalize_messages
# --------------------------------------------------------------------------------------------


def msgs(*items: dict) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in items]


def test_normalize_plain_messages() -> None:
    out = normalize_messages(msgs({"role": "system", "content": "S"},
                                  {"role": "user", "content": "U"},
                                  {"role": "assistant", "content": "A"}))
    assert out == [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                   {"role": "assistant", "content": "A"}]


def test_normalize_developer_becomes_system() -> None:
    out = normalize_messages(msgs({"role": "developer", "content": "rules"},
                                  {"role": "user", "content": "hi"}))
    assert out[0] == {"role": "system", "content": "rules"}


def test_normalize_joins_text_parts() -> None:
    out = normalize_messages(msgs({"role": "user", "content": [
        {"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}))
    assert out == [{"role": "user", "content": "first\nsecond"}]


@pytest.mark.parametrize(("bad", "param_prefix"), [
    # a tool result must answer a call the assistant made
    ({"role": "tool", "content": "result", "tool_call_id": "x"}, "messages[1].tool_call_id"),
    ({"role": "function", "content": "result", "name": "f"}, "messages[1].role"),
    ({"role": "wizard", "content": "abracadabra"}, "messages[1].role"),
    ({"role": "user", "content": None}, "messages[1].content"),
    ({"role": "user", "content": [{"type": "text", "text": "look"},
                                  {"type": "image_url", "image_url": {"detail": "low"}}]},
     "messages[1].content[1].image_url"),
    ({"role": "user", "content": [{"type": "text", "text": "hear"}, {"type": "input_audio"}]},
     "messages[1].content[1]"),
    ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]},
     "messages[1].content"),
])
def test_normalize_rejects(bad: dict, param_prefix: str) -> None:
    with pytest.raises(APIError) as exc:
        normalize_messages(msgs({"role": "user", "content": "ok"}, bad))
    e = exc.value
    assert e.status == 400
    assert e.param == param_prefix
    assert e.type == "invalid_request_error"
    assert e.body()["error"]["param"] == param_prefix


def test_normalize_text_part_without_text_rejected() -> None:
    with pytest.raises(APIError) as exc:
        normalize_messages(msgs({"role": "user", "content": [{"type": "text"}]}))
    assert exc.value.status == 400
    assert exc.value.param == "messages[0].content[0]"


def test_normalize_unknown_role_message_is_truncated() -> None:
    with pytest.raises(APIError) as exc:
        normalize_messages(msgs({"role": "x" * 500, "content": "hi"}))
    assert len(exc.value.message) < 200


# --------------------------------------------------------------------------------------------
# 8. iter_frame_batches
# --------------------------------------------------------------------------------------------


async def _chunks(data: list[bytes]) -> AsyncIterator[bytes]:
    for d in data:
        yield d
        await asyncio.sleep(0)


def batches(data: list[bytes]) -> list[list[dict]]:
    async def go() -> list[list[dict]]:
        return [b async for b in iter_frame_batches(_chunks(data))]

    return asyncio.run(go())


def collect(data: list[bytes]) -> list[dict]:
    out = batches(data)
    assert all(out), "no empty batches"
    return [f for b in out for f in b]


FRAMES = [
    {"text": "Hello", "error_code": 0},
    {"text": "Hello, wörld ☃", "error_code": 0, "usage": {"prompt_tokens": 3}},
    {"text": "", "error_code": 0, "finish_reason": "stop"},
]


def test_iter_frames_whole_stream() -> None:
    body = b"".join(frame(f) for f in FRAMES)
    assert collect([body]) == FRAMES


def test_iter_frames_batches_are_the_frames_each_chunk_completed() -> None:
    a, b, c = (frame(f) for f in FRAMES)
    assert batches([a + b, c]) == [FRAMES[:2], FRAMES[2:]]
    assert batches([a + b[:3], b[3:] + c]) == [FRAMES[:1], FRAMES[1:]]
    assert batches([a[:4], a[4:-1], a[-1:] + b + c]) == [FRAMES]


def test_iter_frames_every_split() -> None:
    body = b"".join(frame(f) for f in FRAMES)
    for i in range(len(body) + 1):
        assert collect([body[:i], body[i:]]) == FRAMES, f"split at {i}"


def test_iter_frames_byte_by_byte_and_random_chunks() -> None:
    body = b"".join(frame(f) for f in FRAMES)
    assert collect([body[i:i + 1] for i in range(len(body))]) == FRAMES
    rng = random.Random(5)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(body)), 6))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert collect(pieces) == FRAMES


def test_iter_frames_skips_empty_pieces() -> None:
    body = b"\0\0" + frame(FRAMES[0]) + b"  \n\0" + b"\0" + frame(FRAMES[2]) + b"\0"
    assert collect([body, b"", b"\n"]) == [FRAMES[0], FRAMES[2]]


def test_iter_frames_empty_stream() -> None:
    assert collect([]) == []
    assert collect([b"", b"  "]) == []


def test_iter_frames_trailing_json_without_nul() -> None:
    err = {"text": "NETWORK ERROR", "error_code": 50006}
    assert collect([frame(FRAMES[0]), json.dumps(err).encode()[:10],
                    json.dumps(err).encode()[10:]]) == [FRAMES[0], err]


def test_iter_frames_trailing_non_json_becomes_error_frame() -> None:
    html = b"<html><body>502 Bad Gateway</body></html>"
    out = collect([frame(FRAMES[0]), html[:7], html[7:]])
    assert out[0] == FRAMES[0]
    assert len(out) == 2
    assert out[1]["error_code"] == 50001
    assert "502 Bad Gateway" in out[1]["text"]


def test_json_helpers_fall_back_to_json_where_orjson_refuses() -> None:
    frame_ = {"text": "wörld ☃", "usage": {"prompt_tokens": 3}, "logprobs": None}
    assert dumps(frame_) == json.dumps(frame_, ensure_ascii=False,
                                       separators=(",", ":")).encode()
    assert loads(dumps(frame_)) == frame_ == loads(dumps(frame_).decode())
    # Integers past 64 bits and lone surrogates are refused by orjson: json writes them.
    assert loads(dumps({"seed": 2**70})) == {"seed": 2**70}
    assert loads(dumps({"text": "a\ud800b"})) == {"text": "a\ud800b"}
    # NaN and Infinity, as Python's json writes them (a FastChat worker's logprob of -inf).
    assert loads(b'{"logprob": -Infinity}')["logprob"] == float("-inf")
    with pytest.raises(ValueError):
        loads(b"{not json")


def test_iter_frames_trailing_error_text_is_bounded() -> None:
    out = collect([b"x" * 5000])
    assert len(out) == 1
    assert out[0]["error_code"] == 50001
    assert len(out[0]["text"]) <= 500


def test_iter_frames_trailing_non_object_json_dropped() -> None:
    assert collect([frame(FRAMES[0]) + b"[1, 2, 3]"]) == [FRAMES[0]]


# -- llamacpp: which slot a request takes ----------------------------------------------------------

def test_llamacpp_slot_choice_keeps_busy_ids_together_unless_a_long_prefix_is_cached() -> None:
    pytest.importorskip("llama_cpp")
    from llmrelay.worker.engines.llamacpp import Options
    from llmrelay.worker.engines.llamacpp.engine import MIN_PREFIX_REUSE, LlamaCppEngine

    engine = LlamaCppEngine(Options(resolve("smollm2").path, context_length=256, n_threads=1,
                                    parallel=8))
    try:
        slots = engine.slots
        for s in slots:  # the state is the scheduler's, which is idle: no request was sent
            s.busy, s.cached, s.last_used = False, [], 0.0
        header = list(range(1, 20))  # a template header every prompt shares
        for i, s in enumerate(slots):
            s.cached, s.last_used = header + [100 + i], float(i)
        slots[2].busy = slots[3].busy = True

        def pick(tokens: list[int]) -> int:
            return engine._pick_slot([s for s in slots if not s.busy], tokens).seq_id

        # A short shared prefix does not decide: a slot next to the busy ones does (1 or 4),
        # the least recently used of those first.
        assert pick(header + [999]) == 1
        slots[1].last_used = 99.0
        assert pick(header + [999]) == 4
        # A conversation's long cached prefix wins, wherever its slot is.
        convo = list(range(500, 500 + MIN_PREFIX_REUSE + 10))
        slots[6].cached = convo
        assert pick(convo + [7, 8, 9]) == 6
        assert pick(convo[: MIN_PREFIX_REUSE - 1] + [7]) == 4  # too short a prefix to matter
        # Nothing busy: the least recently used.
        slots[2].busy = slots[3].busy = False
        assert pick([999]) == 0
    finally:
        engine.close()


# -- transformers: a seeded request's own sampler ---------------------------------------------------

def test_draw_samples_like_multinomial_and_never_a_zero_probability_token() -> None:
    torch = pytest.importorskip("torch")
    from llmrelay.worker.engines.hf.sampling import draw as _draw

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(2, 5)
    for _ in range(4000):
        tokens = _draw(probs, gen)
        assert tokens.shape == (2, 1)
        counts[0, tokens[0, 0]] += 1
        counts[1, tokens[1, 0]] += 1
    freq = counts / 4000
    assert freq[0, 1] == 0 and freq[0, 4] == 0 and freq[1, 4] == 1
    assert torch.allclose(freq[0], probs[0], atol=0.03)
    # The same generator state, the same draws.
    a = _draw(probs, torch.Generator().manual_seed(9))
    assert torch.equal(a, _draw(probs, torch.Generator().manual_seed(9)))


def test_seeded_sampler_draws_within_top_k_and_top_p_and_repeats() -> None:
    torch = pytest.importorskip("torch")
    from llmrelay.worker.engines.base import GenerationRequest
    from llmrelay.worker.engines.hf.sampling import SeededSampler as _SeededSampler

    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    ids = torch.zeros((1, 1), dtype=torch.long)

    def draws(seed: int, **kw: float) -> list[int]:
        sampler = _SeededSampler(seed, GenerationRequest(**kw))
        out = []
        for _ in range(200):
            one_hot = sampler(ids, scores.clone())
            assert int((one_hot == 0).sum()) == 1 and bool(torch.isinf(one_hot).sum() == 5)
            out.append(int(one_hot.argmax()))
        return out

    free = draws(1, temperature=1.0)
    assert len(set(free)) >= 4  # samples, not argmax
    assert draws(1, temperature=1.0) == free  # the same seed, the same draws
    assert draws(2, temperature=1.0) != free
    assert set(draws(1, temperature=1.0, top_k=2)) == {0, 1}
    # top_p 0.7: token 0 has ~0.64 of the mass, token 1 ~0.23 crosses 0.7: both kept, no more
    assert set(draws(1, temperature=1.0, top_p=0.7)) == {0, 1}
    assert set(draws(1, temperature=1.0, top_p=0.5)) == {0}
    assert set(draws(1, temperature=0.05)) == {0}  # a low temperature is nearly greedy


# -- transformers: the batch manager's top-k / top-p warpers --------------------------------------

def test_batch_warpers_pass_through_only_when_no_request_filters() -> None:
    torch = pytest.importorskip("torch")
    gen = pytest.importorskip("transformers.generation.logits_process")
    cb = pytest.importorskip("transformers.generation.continuous_batching.cb_logits_processors")
    from llmrelay.worker.engines.hf.compat import skip_noop_warpers as _skip_noop_warpers

    top_k = cb.ContinuousBatchingTopKLogitsWarper(gen.TopKLogitsWarper(top_k=100))
    top_p = cb.ContinuousBatchingTopPLogitsWarper(gen.TopPLogitsWarper(top_p=0.99))
    originals = (cb.ContinuousBatchingTopKLogitsWarper(gen.TopKLogitsWarper(top_k=100)),
                 cb.ContinuousBatchingTopPLogitsWarper(gen.TopPLogitsWarper(top_p=0.99)))

    class Manager:  # the two attributes _skip_noop_warpers reads
        class logit_processor:  # noqa: N801
            logits_processor = [top_k, top_p]

    _skip_noop_warpers(Manager)
    assert type(top_k) is not cb.ContinuousBatchingTopKLogitsWarper
    assert type(top_p) is not cb.ContinuousBatchingTopPLogitsWarper
    scores = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    off_k = torch.tensor([100, 100, 100], dtype=torch.int32)
    off_p = torch.tensor([1.0, 1.0, 1.0]).view(dtype=torch.int32)
    assert top_k(scores, off_k) is scores and top_p(scores, off_p) is scores
    # one request in the batch filters: every row gets exactly the library's own result
    on_k = torch.tensor([100, 5, 100], dtype=torch.int32)
    on_p = torch.tensor([1.0, 0.5, 1.0]).view(dtype=torch.int32)
    assert torch.equal(top_k(scores, on_k), originals[0](scores, on_k))
    assert torch.equal(top_p(scores, on_p), originals[1](scores, on_p))
    assert int(torch.isinf(top_k(scores, on_k)[1]).sum()) == 95


# -- transformers: the internals it adjusts are checked ------------------------------------------

def test_transformers_internals_are_checked_and_a_missing_one_refuses_to_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    runner = pytest.importorskip("transformers.generation.continuous_batching.model_runner")
    from llmrelay.worker.engines.base import EngineError
    from llmrelay.worker.engines.hf import compat

    compat.check()  # the installed transformers has every internal relied on
    monkeypatch.delattr(runner.ModelRunner, "_sample")
    with pytest.raises(EngineError) as e:
        compat.check()
    message = str(e.value)
    assert "changed its continuous batching internals that llmrelay adjusts" in message
    assert "missing: ModelRunner._sample(scores, output_ids)" in message
    assert message.endswith(f"install {compat.REQUIREMENT}")

    with pytest.raises(EngineError) as e:
        compat.check_manager(object())  # a manager without the attributes adjusted
    assert "manager.logit_processor.prepare_tensor_args" in str(e.value)
    assert "manager.background_thread_status.fatal_error" in str(e.value)

    class Lazy:  # a manager whose model runner is made later (its warmup failed): tolerated
        batch_processor = None

    compat.fast_sampling(Lazy)
