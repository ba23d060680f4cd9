"""Every touch of transformers' internals, in one place: what llmrelay adjusts inside the
continuous batching manager (`transformers.generation.continuous_batching`), which has no public
API for it. These internals change between releases, so `check()` (at load, before the weights
are read) and `check_manager()` (once the manager exists) verify that each class, method and
attribute relied on here is still there, and refuse to load with a clear message otherwise,
rather than silently serving with different sampling or without per-request penalties.

The adjustments:
- `skip_noop_warpers`: the manager's per-request top-k/top-p warpers pass the scores through when
  no request in the batch filters (they sorted the whole vocabulary every step).
- `fast_sampling`: the model runner draws each step's tokens with `sampling.draw` instead of
  torch.multinomial (CPU only).
- `BatchProcessors`: a request's own logits processors (penalties, its seeded sampler) inside
  the manager, which has none per request.
- `fatal_error`: why the manager's background thread stopped.
- `PrefixCache`: counts the prompt tokens the manager's prefix cache served (for the status),
  and drops its cached blocks when told (the image ids' numbering restarted: vision.py).

Written against WRITTEN_FOR (the pin in pyproject.toml). Another version is tried only when
every internal checked here is present, with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import LogitsProcessorList

from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.engines.hf.sampling import draw

log = logging.getLogger("llmrelay.worker")

WRITTEN_FOR = (Version("5.24"), Version("6"))  # transformers >= 5.24, < 6
REQUIREMENT = "transformers>=5.24,<6"
CB = "transformers.generation.continuous_batching"


def _refuse(missing: list[str]) -> EngineError:
    return EngineError(
        f"transformers {transformers.__version__} changed its continuous batching internals that "
        f"llmrelay adjusts (missing: {', '.join(missing)}); install {REQUIREMENT}")


def _params(func: Any) -> list[str]:
    try:
        return list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return []


def check() -> None:
    """Verify the classes and methods of transformers' continuous batching used here (before
    a model loads); EngineError naming what is missing."""
    version = Version(transformers.__version__)
    if not WRITTEN_FOR[0] <= version < WRITTEN_FOR[1]:
        log.warning("transformers %s: llmrelay's transformers engine was written for %s; its "
                    "continuous batching internals are checked before use", version, REQUIREMENT)
    missing: list[str] = []
    try:
        from transformers.generation.continuous_batching import cb_logits_processors as cb
        from transformers.generation.continuous_batching import model_runner, requests
    except ImportError as e:
        raise _refuse([f"{CB} ({e})"]) from e
    methods = {  # class -> (method, its parameters as called or overridden here)
        (cb, "ContinuousBatchingTopKLogitsWarper"): ("__call__", ["self", "scores", "tensor_arg"]),
        (cb, "ContinuousBatchingTopPLogitsWarper"): ("__call__", ["self", "scores", "tensor_arg"]),
        (cb, "ContinuousBatchingLogitsProcessorList"): (
            "prepare_tensor_args", ["self", "requests_in_batch", "arg_storage"]),
        (model_runner, "ModelRunner"): ("_sample", ["self", "scores", "output_ids"]),
    }
    for (mod, cls_name), (method, params) in methods.items():
        cls = getattr(mod, cls_name, None)
        if cls is None:
            missing.append(f"{mod.__name__}.{cls_name}")
        elif _params(getattr(cls, method, None))[: len(params)] != params:
            missing.append(f"{cls_name}.{method}({', '.join(params[1:])})")
    future = getattr(requests, "FutureRequestState", None)
    for name in ("state", "has_new_token"):
        if name not in getattr(future, "__slots__", ()):
            missing.append(f"FutureRequestState.{name}")
    state = getattr(requests, "RequestState", None)
    fields = {f.name for f in dataclasses.fields(state)} if dataclasses.is_dataclass(state) else set()
    for name in ("request_id", "initial_tokens", "generated_tokens"):
        if name not in fields:
            missing.append(f"RequestState.{name}")
    if missing:
        raise _refuse(missing)


def check_manager(manager: Any) -> None:
    """Verify the manager's own attributes used here, once it exists. Its batch processor (and
    so its model runner) may not exist yet: the manager makes it lazily when `warmup` failed,
    and `fast_sampling` then leaves the manager's own sampling alone (tolerated, as before)."""
    missing: list[str] = []
    lp = getattr(manager, "logit_processor", None)
    for name in ("logits_processor", "do_processing", "prepare_tensor_args"):
        if not hasattr(lp, name):
            missing.append(f"manager.logit_processor.{name}")
    if not hasattr(getattr(manager, "continuous_batching_config", None), "use_async_batching"):
        missing.append("manager.continuous_batching_config.use_async_batching")
    if not hasattr(getattr(manager, "background_thread_status", None), "fatal_error"):
        missing.append("manager.background_thread_status.fatal_error")
    if missing:
        raise _refuse(missing)


def check_runner(runner: Any) -> None:
    missing = [f"model_runner.{name}" for name in ("do_sample", "return_logprobs")
               if not hasattr(runner, name)]
    if missing:
        raise _refuse(missing)


def fatal_error(manager: Any) -> Any:
    """Why the manager's background thread stopped (None when it did not fail)."""
    return manager.background_thread_status.fatal_error


def skip_noop_warpers(manager: Any) -> None:
    """The batch manager's per-request top-k and top-p warpers sort the whole vocabulary for
    every sequence at every step, even when no request in the batch asks for them (top_k off,
    top_p 1.0: most OpenAI requests); that was a fifth of a step on CPU. Here they pass the
    scores through unchanged in that case (same results, as a no-op filter would)."""
    from transformers.generation.continuous_batching import cb_logits_processors as cb

    class TopK(cb.ContinuousBatchingTopKLogitsWarper):
        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            if bool((tensor_arg[: scores.size(0)] >= scores.size(-1)).all()):
                return scores
            return super().__call__(scores, tensor_arg)

    class TopP(cb.ContinuousBatchingTopPLogitsWarper):
        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            if bool((tensor_arg[: scores.size(0)].view(dtype=torch.float32) >= 1.0).all()):
                return scores
            return super().__call__(scores, tensor_arg)

    procs = getattr(getattr(manager, "logit_processor", None), "logits_processor", None) or []
    for proc in procs:
        if type(proc) is cb.ContinuousBatchingTopKLogitsWarper:
            proc.__class__ = TopK
        elif type(proc) is cb.ContinuousBatchingTopPLogitsWarper:
            proc.__class__ = TopP


def fast_sampling(manager: Any) -> None:
    """The batch manager draws each step's tokens with torch.multinomial, which on CPU cost ~6%
    of a step of 8 sequences; here it draws them with `draw` (same distribution). A manager
    whose model runner is not there yet (made lazily if warmup failed) keeps its own."""
    runner = getattr(getattr(manager, "batch_processor", None), "model_runner", None)
    if runner is None:
        log.debug("batch manager: its own sampling kept (no model runner to adjust)")
        return
    check_runner(runner)

    class Runner(type(runner)):  # type: ignore[misc]
        def _sample(self, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
            if not self.do_sample or self.return_logprobs:
                return super()._sample(scores, output_ids)
            tokens = draw(torch.softmax(scores[0], dim=-1)).squeeze(-1)
            output_ids[0, : tokens.size(0)].copy_(tokens)
            return None

    runner.__class__ = Runner


class BatchProcessors:
    """A request's own logits processors (penalties, its seeded sampler) inside transformers'
    batch manager, which has none per request. The scores' rows are the batch's requests that
    predict a token this step, in the order the manager prepared them: `install` records that
    order where the manager prepares its per-request arguments. Synchronous batching only (the
    manager's CPU mode); with asynchronous batching (CUDA graphs) the next batch is prepared
    while one runs, so `install` declines and these are then not applied while batched."""

    def __init__(self) -> None:
        self.wanted: dict[str, LogitsProcessorList] = {}  # request id -> its processors
        self.rows: list[Any] = []

    def install(self, manager: Any) -> bool:
        lp = getattr(manager, "logit_processor", None)
        cfg = getattr(manager, "continuous_batching_config", None)
        if lp is None or not getattr(lp, "do_processing", False) or getattr(
                cfg, "use_async_batching", True) is not False:
            return False
        prepare = lp.prepare_tensor_args

        def recording(requests_in_batch: list[Any], arg_storage: torch.Tensor) -> torch.Tensor:
            self.rows = [r.state for r in requests_in_batch if r.has_new_token]
            return prepare(requests_in_batch=requests_in_batch, arg_storage=arg_storage)

        lp.prepare_tensor_args = recording
        lp.logits_processor.insert(0, self)  # before temperature and top-k/top-p, as generate()
        return True

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.wanted:
            return scores
        out = None
        for i, state in enumerate(self.rows[: scores.size(0)]):
            procs = self.wanted.get(state.request_id)
            if procs is None:
                continue
            if out is None:
                out = scores.clone()
            ids = torch.tensor([list(state.initial_tokens) + list(state.generated_tokens)],
                               dtype=torch.long, device=scores.device)
            out[i] = procs(ids, out[i : i + 1])[0]
        return scores if out is None else out


class PrefixCache:
    """The batch manager's prefix cache (block sharing), seen from outside: `hits` and `tokens`
    count the requests that found a cached prefix and the prompt tokens it covered; when
    `epoch()` changes, the cached blocks are dropped before the next match (on the manager's
    own thread, where it matches). A manager without a batch processor yet (made lazily when
    warmup failed) is left alone: nothing is counted."""

    def __init__(self, epoch: Any = None) -> None:
        self.hits = 0
        self.tokens = 0
        self.enabled = False
        self.epoch = epoch  # a callable giving the current epoch, or None
        self.seen = epoch() if epoch is not None else 0

    def install(self, manager: Any) -> bool:
        cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
        search = getattr(cache, "search_prefix_match", None)
        if search is None or not hasattr(cache, "evict_cached_blocks"):
            if self.epoch is not None:  # images need the flush: refuse rather than risk a stale hit
                raise _refuse(["manager.batch_processor.cache.search_prefix_match"])
            return False

        def counting(request_id: str, prompt_ids: list[int]) -> int:
            if self.epoch is not None and self.epoch() != self.seen:
                self.seen = self.epoch()
                cache.evict_cached_blocks()
            n = int(search(request_id, prompt_ids))
            if n > 0:
                self.hits += 1
                self.tokens += n
            return n

        cache.search_prefix_match = counting
        self.enabled = bool(getattr(cache, "use_prefix_sharing", False))
        return True
