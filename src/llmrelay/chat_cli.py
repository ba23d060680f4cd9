"""`llmrelay chat`: a multi-turn terminal chat with any OpenAI-compatible server (the seed's client).

Answers stream as they are generated, through chat completions or, with `--api responses`, the
Responses API. The history keeps the last `--max-turns` exchanges (the
system prompt always stays). Commands: `reset` (forget the conversation), `history` (show it),
`/image PATH` (attach an image file to the next message: PNG, JPEG, GIF or WebP, sent inline
as a data URL, for a model that reads images), `quit` (or `exit`, Ctrl-D). A failed request
takes the unanswered message (and its images) back out of the history and says what went
wrong; Ctrl-C during an answer stops it and keeps what was said.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # imported when the chat starts: every other subcommand starts faster
    import openai

COMMANDS = "commands: reset, history, /image PATH, quit"
# An image file's type by its first bytes (not its name), as the server checks it.
IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
               (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


def image_part(path: str) -> dict[str, Any]:
    """A chat content part holding the image file at `path` as a data URL; ValueError saying
    what is wrong with the file otherwise."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    mime = next((m for magic, m in IMAGE_MAGIC if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise ValueError(f"{path} is not a PNG, JPEG, GIF or WebP image")
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def shown(content: str | list[dict[str, Any]]) -> str:
    """A message's content as `history` prints it (images as a mark)."""
    if isinstance(content, str):
        return content
    return " ".join(p["text"] if p["type"] == "text" else "[image]" for p in content)


def responses_input(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns as Responses input items: a user's text and images as input parts."""
    out = []
    for m in turns:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "input_text", "text": p["text"]} if p["type"] == "text" else
                       {"type": "input_image", "image_url": p["image_url"]["url"]}
                       for p in content]
        out.append({"role": m["role"], "content": content})
    return out


class Conversation:
    """The messages sent with each request: system prompt + the last `max_turns` exchanges."""

    def __init__(self, system: str | None = None, max_turns: int = 10) -> None:
        self.system = system
        self.max_turns = max(1, max_turns)
        self.turns: list[dict[str, Any]] = []  # user/assistant messages, oldest first

    def add_user(self, text: str, images: list[dict[str, Any]] | None = None) -> None:
        """A user's message; with `images` (image_part's), a list of its images, then its text
        (images first, as the providers advise)."""
        content: str | list[dict[str, Any]] = text
        if images:
            content = [*images, {"type": "text", "text": text}]
        self.turns.append({"role": "user", "content": content})

    def add_assistant(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})
        self.truncate()

    def drop_unanswered(self) -> None:
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()

    def truncate(self) -> None:
        users = [i for i, m in enumerate(self.turns) if m["role"] == "user"]
        if len(users) > self.max_turns:
            self.turns = self.turns[users[-self.max_turns]:]

    def reset(self) -> None:
        self.turns = []

    def messages(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


def describe_error(e: Exception) -> str:
    import openai

    if isinstance(e, openai.APIStatusError):
        message = e.message
        try:
            body: Any = e.response.json()
            message = body["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        return f"the server answered {e.status_code}: {message}"
    if isinstance(e, openai.APIConnectionError):
        return f"could not reach the server ({e.__cause__ or e})"
    return f"{type(e).__name__}: {e}"


def pick_model(client: openai.OpenAI, wanted: str | None) -> str:
    if wanted:
        return wanted
    models = [m.id for m in client.models.list().data]
    if not models:
        raise SystemExit("error: the server serves no model right now; try again or pass --model")
    return models[0]


def stream_answer(client: openai.OpenAI, model: str, conv: Conversation, args: argparse.Namespace,
                  out: TextIO, parts: list[str]) -> None:
    """Print the answer as it streams, collecting its pieces in `parts` (kept if interrupted)."""
    if getattr(args, "api", "chat") == "responses":
        return stream_response(client, model, conv, args, out, parts)
    kwargs: dict[str, Any] = {}
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.max_tokens is not None:
        kwargs["max_tokens"] = args.max_tokens
    stream = client.chat.completions.create(model=model, messages=conv.messages(),  # type: ignore[arg-type]
                                            stream=True, **kwargs)
    thinking = Thinking(out)
    try:
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            # a reasoning model's reasoning (reasoning_content) is shown greyed, never kept
            thinking.show(getattr(delta, "reasoning_content", None) or "")
            if delta.content:
                thinking.end()
                parts.append(delta.content)
                out.write(delta.content)
                out.flush()
    finally:
        thinking.end()
        stream.close()  # on Ctrl-C this closes the connection: the server stops generating


class Thinking:
    """A reasoning model's reasoning as it streams: dim on a terminal, between `[thinking]`
    and `[/thinking]` elsewhere; apart from the answer, and not part of the history."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.open = False

    def show(self, text: str) -> None:
        if not text:
            return
        if not self.open:
            self.open = True
            self.out.write("\x1b[2m" if self.tty else "[thinking] ")
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.open:
            self.open = False
            self.out.write("\x1b[0m\n" if self.tty else " [/thinking]\n")
            self.out.flush()


def stream_response(client: openai.OpenAI, model: str, conv: Conversation,
                    args: argparse.Namespace, out: TextIO, parts: list[str]) -> None:
    """The same through the Responses API (`--api responses`): the system prompt as
    `instructions`, the turns as input items, nothing stored (the history is kept here)."""
    import openai

    kwargs: dict[str, Any] = {}
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.max_tokens is not None:
        kwargs["max_output_tokens"] = args.max_tokens
    if conv.system:
        kwargs["instructions"] = conv.system
    stream = client.responses.create(model=model, input=responses_input(conv.turns),  # type: ignore[arg-type]
                                     store=False, stream=True, **kwargs)
    thinking = Thinking(out)
    try:
        for event in stream:
            if event.type in ("response.reasoning_text.delta",
                              "response.reasoning_summary_text.delta"):
                thinking.show(event.delta)
            elif event.type == "response.output_text.delta":
                thinking.end()
                parts.append(event.delta)
                out.write(event.delta)
                out.flush()
            elif event.type == "response.failed":
                error = event.response.error
                raise openai.APIError(error.message if error else "the response failed",
                                      request=stream.response.request, body=None)
            elif event.type == "error":
                raise openai.APIError(event.message, request=stream.response.request, body=None)
    finally:
        thinking.end()
        stream.close()


def run(args: argparse.Namespace) -> None:
    import openai

    out = sys.stdout
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "none",
                           max_retries=0, timeout=args.timeout)
    try:
        model = pick_model(client, args.model)
    except openai.OpenAIError as e:
        raise SystemExit(f"error: cannot list models at {args.base_url}: {describe_error(e)}") from e
    conv = Conversation(args.system, args.max_turns)
    via = " through /v1/responses" if args.api == "responses" else ""
    print(f"chatting with {model} at {args.base_url}{via} ({COMMANDS})", file=out, flush=True)
    images: list[dict[str, Any]] = []  # attached with /image, sent with the next message
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=out)
            return
        except KeyboardInterrupt:
            print(file=out)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("quit", "exit"):
            return
        if text == "reset":
            conv.reset()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            try:
                images.append(image_part(path))
            except ValueError as e:
                print(f"({e})" if path else "(usage: /image PATH)", file=out, flush=True)
                continue
            print(f"(image {path} attached to your next message)", file=out, flush=True)
            continue
        if text == "history":
            for m in conv.messages():
                print(f"[{m['role']}] {shown(m['content'])}", file=out)
            if not conv.turns:
                print("(no messages yet)", file=out)
            out.flush()
            continue
        conv.add_user(line, images)
        images = []
        out.write(f"{model}> ")
        out.flush()
        parts: list[str] = []
        try:
            stream_answer(client, model, conv, args, out, parts)
        except KeyboardInterrupt:
            print("\n(stopped)", file=out, flush=True)
            conv.add_assistant("".join(parts))  # what was said so far stays in the history
            continue
        except openai.OpenAIError as e:
            conv.drop_unanswered()
            print(f"\nerror: {describe_error(e)} (your message was not added to the history)",
                  file=out, flush=True)
            continue
        conv.add_assistant("".join(parts))
        print(file=out, flush=True)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                   help="any OpenAI-compatible API (default: env OPENAI_BASE_URL, else "
                   "http://127.0.0.1:8000/v1)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="API key (default: env OPENAI_API_KEY)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--system", default=None, help="system prompt, kept through truncation")
    p.add_argument("--max-turns", type=int, default=10,
                   help="exchanges kept in the history sent with each request (default 10)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api", choices=["chat", "responses"], default="chat",
                   help="chat completions (default) or the Responses API (/v1/responses)")
