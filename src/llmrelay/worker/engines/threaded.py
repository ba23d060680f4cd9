"""What the engines that compute on a scheduler thread of their own share (llama.cpp,
transformers): preparing a prompt, the context and max-token rules, echo, turning sampled tokens
into text (UTF-8 decoder, stop strings, stop tokens, length, the final flush), and handing
chunks from the scheduler thread to the worker's event loop.

An engine built on `ThreadedEngine` implements the model side only: `tokenize`, `detokenize`,
`piece` (a token's bytes), `is_end` (an end-of-generation token), `submit` (queue a prepared
`Generation` for its scheduler) and whatever its scheduler needs; the scheduler calls
`take(gen, token)` for each sampled token and `finish(gen, reason)` when it ends one itself,
then `wake()` once it has posted a step's chunks.

Hand-off: chunks are posted to a `Mailbox`, which wakes the event loop once for everything
posted before it runs (a batch step's chunks of every stream), not once per chunk; a reader
that fell behind gets the chunks waiting for it merged into one.
"""

from __future__ import annotations

import asyncio
import codecs
import threading
from abc import abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable

from llmrelay.protocol import ErrorCode, LogprobEntry
from llmrelay.worker.engines.base import (
    Chunk,
    Engine,
    EngineError,
    GenerationRequest,
    StopMatcher,
    context_overflow,
)
from llmrelay.worker.reasoning import ReasoningParser

Item = Chunk | Exception | None  # a chunk; None: the end; an Exception: the end, failed
# A token whose text is held back (half a character, a possible stop string) waits for the next
# chunk; after this many such tokens a chunk goes anyway (no text), so its reader knows them.
TOKENS_PER_CHUNK = 8


class Mailbox:
    """Hands items from engine threads to queues on one event loop. `post` from any thread;
    `wake` schedules one drain for everything posted until it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[tuple[asyncio.Queue[Item], Item]] = deque()
        self.scheduled = False

    def post(self, queue: asyncio.Queue[Item], item: Item) -> None:  # any thread
        self.items.append((queue, item))

    def wake(self) -> None:  # any thread
        if self.items and not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the event loop is closed: nobody reads this any more
                pass

    def _drain(self) -> None:  # the event loop
        self.scheduled = False  # before draining: an item posted from now on schedules again
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)


class Generation:
    """One request inside a scheduler: its prompt, its limits, and the text made so far.
    Engines subclass it to keep their own per-request state."""

    def __init__(self, req: GenerationRequest, mailbox: Mailbox) -> None:
        self.req = req
        self.mailbox = mailbox
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.cancel = threading.Event()  # set when the reader leaves
        self.tokens: list[int] = []  # the prompt
        self.max_new = 0
        self.generated: list[int] = []
        self.stop_ids = set(req.stop_token_ids)
        self.stops = StopMatcher(list(req.stop))
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending: list[LogprobEntry] = []  # logprobs not yet sent
        self.sent = 0  # generated tokens already in a chunk
        # Resumed from an earlier worker: these tokens are generated again first (the engine
        # forces each as its next token, so the computation is the one the earlier worker
        # did), their text only rebuilt, not sent.
        self.forced: list[int] = list(req.generated)
        self.replayed_text = ""
        self.done = False
        # A thinking budget (reasoning.py): the reasoning block is followed as the text comes;
        # once it has taken `budget` tokens and is still open, the engine writes the tokens of
        # its closing text itself, as the model would have, from position `closing_at` of the
        # generated tokens.
        thinking = req.thinking
        self.budget = thinking.budget if thinking is not None else None
        self.reasoning = (ReasoningParser(thinking.format)
                          if thinking is not None and self.budget is not None else None)
        self.thought = 0  # reasoning tokens the model wrote
        self.closing: list[int] = []
        self.closing_at = -1
        self.drafted: list[int] | None = None  # speculation: [proposed, accepted] so far

    @property
    def replaying(self) -> bool:
        return len(self.generated) < len(self.forced)

    def forced_at(self, position: int) -> int | None:
        """The token the engine must produce at `position` of the generated tokens, if any:
        while replaying, the earlier worker's; then the closing of a reasoning block past its
        budget."""
        if position < len(self.forced):
            return self.forced[position]
        at = position - self.closing_at
        return self.closing[at] if self.closing and 0 <= at < len(self.closing) else None

    def next_forced(self) -> int | None:
        """The token the engine must produce next (see `forced_at`)."""
        return self.forced_at(len(self.generated))

    def close_reasoning(self, tokens: list[int]) -> None:
        """Write `tokens` (a reasoning block's closing) next."""
        self.closing, self.closing_at = tokens, len(self.generated)

    def think(self, token: int, text: str, close: Callable[[], list[int]]) -> None:
        """Follow the reasoning block through one more token (already in `generated`) and its
        text; past the budget, have the engine close the block (`close()` makes its tokens)."""
        parser = self.reasoning
        if parser is None or self.budget is None:
            return
        at = len(self.generated) - 1 - self.closing_at
        if parser.in_reasoning and not (self.closing and 0 <= at < len(self.closing)):
            self.thought += 1  # (the closing the engine writes is not the model's reasoning)
        parser.feed(text)
        if parser.in_reasoning and self.thought >= self.budget and not self.closing:
            self.close_reasoning(close())

    @property
    def gone(self) -> bool:
        return self.cancel.is_set()

    def post(self, item: Item) -> None:
        self.mailbox.post(self.queue, item)

    def emit(self, item: Item) -> None:
        """Post and wake the loop at once (outside a scheduler's step)."""
        self.post(item)
        self.mailbox.wake()

    def chunk(self, text: str, finish_reason: str | None = None,
              stop_sequence: str | None = None) -> Chunk:
        new = self.generated[self.sent:]
        self.sent = len(self.generated)
        out = Chunk(text, len(self.tokens), len(self.generated), finish_reason, self.pending,
                    token_ids=new, stop_sequence=stop_sequence,
                    drafted=(self.drafted[0], self.drafted[1])
                    if finish_reason and self.drafted is not None else None)
        self.pending = []
        return out

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The chunks on the event loop; those waiting together come merged into one."""
        while True:
            item = await self.queue.get()
            # The echoed prompt (no tokens generated yet) stays a chunk of its own: logprob
            # offsets count from where the generated text starts.
            if isinstance(item, Chunk) and item.completion_tokens == 0 and not item.finish_reason:
                yield item
                continue
            if isinstance(item, Chunk):
                while not self.queue.empty():
                    later = self.queue.get_nowait()
                    if not isinstance(later, Chunk):
                        yield item
                        item = later
                        break
                    item = item.merge(later)
                else:
                    yield item
                    continue
            if item is None:
                return
            raise item


class ThreadedEngine(Engine):
    """An engine whose model runs on a scheduler thread of its own (see the module docstring)."""

    generation_class: type[Generation] = Generation

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.closed = False
        self._mailbox: Mailbox | None = None

    # ---- what the model side implements ----------------------------------------------------

    @abstractmethod
    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt; `chat`: a prompt rendered by the chat template (which writes
        its own special tokens)."""

    @abstractmethod
    def detokenize(self, tokens: list[int]) -> str: ...

    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def is_end(self, token: int) -> bool:
        """Whether `token` ends a generation (the model's end-of-generation tokens)."""

    @abstractmethod
    def piece(self, gen: Generation, token: int) -> bytes:
        """The bytes `token` adds to `gen`'s text (it is already in `gen.generated`)."""

    @abstractmethod
    def submit(self, gen: Generation) -> None:
        """Queue a prepared generation for the scheduler (called with `cond` held)."""

    def prepare(self, gen: Generation) -> None:
        """Per-request set-up off the scheduler thread, before `submit` (e.g. samplers)."""

    # ---- the caller's side --------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        gen = self.generation_class(req, self._mailbox_here())
        await asyncio.to_thread(self._admit, gen)  # renders and tokenizes the prompt
        try:
            async for chunk in gen.chunks():
                yield chunk
        finally:
            gen.cancel.set()  # no-op when finished; stops the generation when the reader left

    async def count_tokens(self, text: str) -> int:
        return len(await asyncio.to_thread(self.tokenize, text))

    async def count_prompt(self, req: GenerationRequest) -> int:
        return len(await self.prompt_ids(req))

    async def prompt_ids(self, req: GenerationRequest) -> list[int]:
        return await asyncio.to_thread(self.prompt_tokens, req)

    async def text_of(self, tokens: list[int]) -> str:
        n_vocab = self.vocab_size()
        bad = [t for t in tokens if not 0 <= t < n_vocab]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})",
                              ErrorCode.PARAM_OUT_OF_RANGE)
        return await asyncio.to_thread(self.detokenize, tokens)

    def _mailbox_here(self) -> Mailbox:
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox

    def prompt_tokens(self, req: GenerationRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            n_vocab = self.vocab_size()
            bad = [t for t in req.prompt_token_ids if not 0 <= t < n_vocab]
            if bad:
                raise EngineError(f"token id {bad[0]} is outside the vocabulary "
                                  f"(0..{n_vocab - 1})", ErrorCode.PARAM_OUT_OF_RANGE)
            return list(req.prompt_token_ids)
        if req.messages is not None:
            return self.tokenize(self.render_chat(req.messages, req.template_tools,
                                                  req.template_kwargs), chat=True)
        return self.tokenize(req.prompt or "")

    def _admit(self, gen: Generation) -> None:
        """The rules every request meets before it is queued; raises EngineError to refuse."""
        req = gen.req
        if req.logprobs is not None and not self.features().logprobs:
            raise EngineError(f"logprobs are not served by the {self.name} engine",
                              ErrorCode.PARAM_OUT_OF_RANGE)
        if req.logit_bias:  # (llama.cpp would wrap an id past 32 bits and bias another token)
            n_vocab = self.vocab_size()
            bad = [t for t in req.logit_bias if not 0 <= t < n_vocab]
            if bad:
                raise EngineError(f"logit_bias: token id {bad[0]} is outside the vocabulary "
                                  f"(0..{n_vocab - 1})", ErrorCode.PARAM_OUT_OF_RANGE, "logit_bias")
        tokens = self.prompt_tokens(req)
        n_prompt, n_ctx = len(tokens), self.context_length()
        if n_prompt == 0:
            raise EngineError("the prompt is empty", ErrorCode.PARAM_OUT_OF_RANGE)
        if n_prompt + len(gen.forced) >= n_ctx:
            raise context_overflow(n_ctx, n_prompt + len(gen.forced))
        if gen.forced:
            n_vocab = self.vocab_size()
            bad = [t for t in gen.forced if not 0 <= t < n_vocab]
            if bad:
                raise EngineError(f"generated token id {bad[0]} is outside the vocabulary "
                                  f"(0..{n_vocab - 1})", ErrorCode.PARAM_OUT_OF_RANGE)
            if not self.features().continuation:
                raise EngineError(f"the {self.name} engine cannot resume a generation",
                                  ErrorCode.VALIDATION_TYPE_ERROR)
        room = n_ctx - n_prompt
        gen.tokens = tokens
        gen.max_new = room if req.max_new_tokens is None else min(req.max_new_tokens, room)
        self._refuse_if_closed()
        if req.echo and not gen.forced:
            gen.emit(Chunk(self.detokenize(tokens), n_prompt, 0))
        if gen.max_new <= len(gen.forced):
            gen.emit(Chunk("", n_prompt, len(gen.forced), "length"))
            gen.emit(None)
            return
        thinking = req.thinking
        if (thinking is not None and thinking.budget == 0 and thinking.format.starts_open
                and not gen.forced):
            gen.close_reasoning(self._closing(gen))  # no reasoning at all: closed at once
        self.prepare(gen)
        with self.cond:
            if self.closed:
                gen.emit(EngineError("the engine is shutting down"))
                return
            self.submit(gen)
            self.cond.notify()

    def stop_scheduler(self) -> bool:
        """Mark the engine closed and wake its scheduler; False when it already was closed."""
        with self.cond:
            if self.closed:
                return False
            self.closed = True
            self.cond.notify_all()
        return True

    def close(self) -> None:
        """Stop the scheduler and free the model, off the event loop (engines extend it)."""
        self.stop_scheduler()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _refuse_if_closed(self) -> None:
        with self.cond:
            if self.closed:
                raise EngineError("the engine is shutting down")

    # ---- the scheduler's side -----------------------------------------------------------------

    def take(self, gen: Generation, token: int, logprob: LogprobEntry | None = None) -> str | None:
        """Handle one sampled token of `gen`: post its text, or end it. Returns the finish
        reason when the generation ended (the scheduler then frees what it held for it)."""
        if gen.gone:
            return self.finish(gen, "abort")
        if gen.replaying:
            if token != gen.next_forced():  # never: the engine forces them (a bug if it did not)
                self.fail(gen, EngineError(f"resuming: the engine produced token {token} where "
                                           f"{gen.next_forced()} was generated before"))
                return "error"
            self._replay(gen, token)
            return None
        if self.is_end(token) or token in gen.stop_ids:
            return self.finish(gen, "stop")
        if logprob is not None:
            gen.pending.append(logprob)
        gen.generated.append(token)
        piece = gen.decoder.decode(self.piece(gen, token))
        gen.think(token, piece, lambda: self._closing(gen))
        text, hit = gen.stops.feed(piece)
        if hit:
            gen.post(gen.chunk(text))
            return self.finish(gen, "stop", stop_hit=True)
        if text or gen.pending or len(gen.generated) - gen.sent >= TOKENS_PER_CHUNK:
            gen.post(gen.chunk(text))
        if len(gen.generated) >= gen.max_new:
            return self.finish(gen, "length")
        return None

    def _closing(self, gen: Generation) -> list[int]:
        """The tokens that close `gen`'s reasoning block (its format's closing text)."""
        assert gen.req.thinking is not None
        return self.tokenize(gen.req.thinking.format.closing_text, chat=True)

    def _replay(self, gen: Generation, token: int) -> None:
        """One token of a resumed generation, generated again: its text rebuilds the decoder's
        and the stop matcher's state (what the earlier worker sent); none of it is sent, but
        the first chunk after the replay says it (`replayed`), for the worker's parser."""
        gen.generated.append(token)
        piece = gen.decoder.decode(self.piece(gen, token))
        gen.think(token, piece, lambda: self._closing(gen))
        text, _ = gen.stops.feed(piece)
        gen.replayed_text += text
        if not gen.replaying:
            gen.sent = len(gen.generated)
            chunk = gen.chunk("")
            chunk.replayed = gen.replayed_text
            gen.post(chunk)

    def finish(self, gen: Generation, reason: str, stop_hit: bool = False) -> str:
        """End `gen` with `reason`: release the text held back (a possible stop string, half a
        UTF-8 character) unless a stop string was hit, and post the last chunk."""
        if gen.done:
            return reason
        gen.done = True
        tail = ""
        if not stop_hit:
            tail, _ = gen.stops.feed(gen.decoder.decode(b"", final=True))
            tail += gen.stops.flush()
        gen.post(gen.chunk(tail, reason, gen.stops.matched if stop_hit else None))
        gen.post(None)
        return reason

    def fail(self, gen: Generation, error: Exception) -> None:
        """End `gen` with an error (its reader raises it)."""
        if not gen.done:
            gen.done = True
            gen.post(error)

    def wake(self) -> None:
        """Hand what the scheduler posted to the event loop (once per step)."""
        if self._mailbox is not None:
            self._mailbox.wake()
