"""`llmrelay chat` through a pseudo-terminal (pexpect): streamed answers, truncated history with
the system prompt kept, reset/history/quit, Ctrl-C stopping an answer, a failed request
taken back out of the history with the reason shown, and the same chat through the Responses
API (`--api responses`), and `/image PATH` attaching an image to the next message."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import Stack, free_port
from llmrelay.chat_cli import Conversation

pexpect = pytest.importorskip("pexpect")

TIMEOUT = 180  # a hang guard for CPU models on a loaded machine, not a measure


def chat(stack_api: str, *args: str):  # type: ignore[no-untyped-def]
    child = pexpect.spawn(sys.executable, ["-m", "llmrelay.cli", "chat", "--base-url",
                                           stack_api + "/v1", *args],
                          encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 200))
    return child


def ask(child, text: str, model: str = "smol") -> str:  # type: ignore[no-untyped-def]
    child.sendline(text)
    child.expect_exact(f"{model}> ")
    child.expect_exact("you> ")
    return child.before.strip()


def history(child) -> list[str]:  # type: ignore[no-untyped-def]
    child.sendline("history")
    child.expect_exact("you> ")
    return [line.strip() for line in child.before.splitlines()[1:] if line.strip()]


def test_conversation_history_reset_quit(stack: Stack) -> None:
    child = chat(stack.api, "--model", "smol", "--system", "You are terse.", "--max-turns", "1",
                 "--max-tokens", "12", "--temperature", "0")
    child.expect_exact("chatting with smol")
    child.expect_exact("you> ")
    first = ask(child, "Name a colour.")
    assert first
    h = history(child)
    assert h[0] == "[system] You are terse."
    assert h[1] == "[user] Name a colour."
    assert h[2].startswith("[assistant]") and h[2].split(" ", 1)[1] in first
    ask(child, "Name a fruit.")
    h = history(child)
    # One turn kept (--max-turns 1), the system prompt always.
    assert h[0] == "[system] You are terse."
    assert h[1] == "[user] Name a fruit." and h[2].startswith("[assistant]")
    assert not any("colour" in line for line in h)
    child.sendline("reset")
    child.expect_exact("(conversation cleared)")
    child.expect_exact("you> ")
    assert history(child) == ["[system] You are terse.", "(no messages yet)"]
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_failed_request_is_taken_out_and_explained(stack: Stack) -> None:
    child = chat(stack.api, "--model", "smoll")
    child.expect_exact("you> ")
    child.sendline("hello?")
    child.expect_exact("error: the server answered 404: The model 'smoll' does not exist")
    child.expect_exact("Did you mean 'smol'?")
    child.expect_exact("your message was not added to the history")
    child.expect_exact("you> ")
    assert history(child) == ["(no messages yet)"]
    child.sendeof()
    child.expect(pexpect.EOF)


def test_ctrl_c_stops_the_answer_and_keeps_the_chat(stack: Stack) -> None:
    child = chat(stack.api, "--model", "smol", "--max-tokens", "1500", "--temperature", "1")
    child.expect_exact("you> ")
    child.sendline("Write a very long story about a dragon.")
    child.expect_exact("smol> ")
    child.expect(r"\w+ \w+ \w+")  # some of the answer has streamed in
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact("you> ")
    h = history(child)
    assert h[0] == "[user] Write a very long story about a dragon."
    assert h[1].startswith("[assistant] ")  # the partial answer stays
    child.sendline("quit")
    child.expect(pexpect.EOF)


def test_responses_api_chat(stack: Stack) -> None:
    """`--api responses`: the same chat through /v1/responses (instructions + input items)."""
    child = chat(stack.api, "--model", "smol", "--api", "responses", "--system", "Be terse.",
                 "--max-tokens", "12", "--temperature", "0")
    child.expect_exact("chatting with smol at ")
    child.expect_exact("through /v1/responses")
    child.expect_exact("you> ")
    first = ask(child, "Name a colour.")
    second = ask(child, "And a fruit?")
    assert first and second
    h = history(child)
    assert h[0] == "[system] Be terse." and h[1] == "[user] Name a colour."
    assert h[3] == "[user] And a fruit?" and h[4].startswith("[assistant]")
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child = chat(stack.api, "--model", "smoll", "--api", "responses")
    child.expect_exact("you> ")
    child.sendline("hello?")
    child.expect_exact("error: the server answered 404: The model 'smoll' does not exist")
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)


def test_unreachable_server_is_a_clear_error() -> None:
    child = pexpect.spawn(sys.executable, ["-m", "llmrelay.cli", "chat", "--base-url",
                                           f"http://127.0.0.1:{free_port()}/v1"],
                          encoding="utf-8", timeout=60)
    child.expect_exact("cannot list models")
    child.expect_exact("could not reach the server")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


def test_default_model_is_the_servers_first(stack: Stack) -> None:
    child = chat(stack.api)
    child.expect(r"chatting with (\w+) at ")
    assert child.match.group(1) in ("gemma", "smol")
    child.sendline("quit")
    child.expect(pexpect.EOF)


def test_truncation_keeps_the_last_turns() -> None:
    conv = Conversation("sys", max_turns=2)
    for i in range(4):
        conv.add_user(f"q{i}")
        conv.add_assistant(f"a{i}")
    assert conv.messages() == [{"role": "system", "content": "sys"},
                               {"role": "user", "content": "q2"},
                               {"role": "assistant", "content": "a2"},
                               {"role": "user", "content": "q3"},
                               {"role": "assistant", "content": "a3"}]
    conv.add_user("q4")
    conv.drop_unanswered()
    assert conv.messages()[-1] == {"role": "assistant", "content": "a3"}


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_image_command_sends_the_image_with_the_next_message(stack: Stack, tmp_path: Path,
                                                             api: str) -> None:
    """`/image PATH` attaches the file to the next message as an image part: the text-only
    `smol` refuses it by naming the image part (so the image went as one), the message and its
    image leave the history, and a file that is no image is refused before anything is sent."""
    png = tmp_path / "dot.png"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    png.write_bytes(buf.getvalue())
    (tmp_path / "notes.txt").write_text("not an image")
    child = chat(stack.api, "--model", "smol", "--api", api, "--max-tokens", "8")
    child.expect_exact("you> ")
    child.sendline(f"/image {tmp_path / 'notes.txt'}")
    child.expect_exact("is not a PNG, JPEG, GIF or WebP image")
    child.expect_exact("you> ")
    child.sendline("/image /no/such/file.png")
    child.expect_exact("cannot read /no/such/file.png")
    child.expect_exact("you> ")
    child.sendline(f"/image {png}")
    child.expect_exact(f"(image {png} attached to your next message)")
    child.expect_exact("you> ")
    child.sendline("What colour is this?")
    child.expect_exact("The model 'smol' takes no images")
    part = "messages[0].content[0].image_url" if api == "chat" else "input[0].content[0]"
    child.expect_exact(part)
    child.expect_exact("your message was not added to the history")
    child.expect_exact("you> ")
    assert history(child) == ["(no messages yet)"]
    assert ask(child, "Say hi.")  # the image went with that message only
    assert history(child)[0] == "[user] Say hi."
    child.sendeof()
    child.expect(pexpect.EOF)


def test_history_marks_images() -> None:
    conv = Conversation()
    conv.add_user("look", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}])
    from llmrelay.chat_cli import responses_input, shown

    assert shown(conv.turns[0]["content"]) == "[image] look"
    assert responses_input(conv.turns) == [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,"},
        {"type": "input_text", "text": "look"}]}]
