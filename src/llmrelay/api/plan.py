"""The typed internal request every front door turns its request into: a `Plan`.

Chat completions, text completions, the Responses API and Anthropic's Messages API each convert
their own request (`to_plan` in each door's serving module) into the model, the sampling
settings (`Sampling`, with this server's defaults filled in), n, the chat messages or the text
prompts, echo, the constraints (api/tools.py), the conversation's prefix keys (for `prefix`
dispatch), who asks (`Caller`: the API key's name and priority class, explicit rather than
read from the request's context) and the reasoning settings. The pipeline opens the plan's
generations (one per prompt and choice) with the worker params made here, in one place
(`worker_params`), and the transport adds the caller for workers that order their queue by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmrelay.api.errors import bad_param
from llmrelay.api.table import Accept
from llmrelay.api.tools import Constraints

if TYPE_CHECKING:
    from llmrelay.api.keys import Key

# FastChat's default rather than OpenAI's 1.0: small local models ramble at 1.0, and FastChat
# users expect 0.7.
DEFAULT_TEMPERATURE = 0.7


@dataclass(frozen=True)
class Caller:
    """Who a request is for, as the workers' fair queues see it (never the key's secret)."""

    name: str
    priority: str = "interactive"

    @classmethod
    def of(cls, key: Key | None) -> Caller | None:
        """The caller of a request made with `key` (None: a server without API keys)."""
        return None if key is None else cls(key.name, key.priority)


# reasoning_effort -> the thinking budget in reasoning tokens (docs/reasoning.md); `none`
# switches thinking off.
EFFORT_BUDGETS = {"minimal": 64, "low": 512, "medium": 2048, "high": 8192}
EFFORTS = ("none", *EFFORT_BUDGETS)


@dataclass(frozen=True)
class ReasoningSettings:
    """What a request asks of a reasoning model: whether to reason, how hard (`effort`:
    minimal, low, medium, high), and a budget of reasoning tokens (which wins over the
    effort's)."""

    enabled: bool = True
    effort: str | None = None
    budget_tokens: int | None = None

    @property
    def budget(self) -> int | None:
        """The reasoning tokens the engine allows before it closes the block (None: no limit)."""
        if self.budget_tokens is not None:
            return self.budget_tokens
        return EFFORT_BUDGETS.get(self.effort or "")

    def wire(self) -> dict[str, Any]:
        """Our workers' `reasoning` extension."""
        out: dict[str, Any] = {}
        if not self.enabled:
            out["enabled"] = False
        elif self.budget is not None:
            out["budget"] = self.budget
        return out


NO_REASONING_SETTINGS = ReasoningSettings()


def reasoning_object(obj: Any, effort: str | None, param: str) -> ReasoningSettings:
    """A `reasoning` object (`effort`, `max_tokens`, `enabled`; OpenRouter's shape, also taken
    by our Responses API) as the settings; 400s naming the field."""
    if not isinstance(obj, dict):
        raise bad_param(param, f"{param} must be an object.")
    effort = obj.get("effort", effort)
    if effort is not None and effort not in EFFORTS:
        raise bad_param(f"{param}.effort", f"{param}.effort must be one of "
                        f"{', '.join(EFFORTS)}; got {str(effort)[:40]!r}.")
    budget = obj.get("max_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or not 0 <= budget <= 2**31 - 1):
        raise bad_param(f"{param}.max_tokens", f"{param}.max_tokens must be a whole number "
                        "of reasoning tokens, 0 or more.")
    enabled = obj.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise bad_param(f"{param}.enabled", f"{param}.enabled must be true or false.")
    return ReasoningSettings(enabled is not False and effort != "none", effort, budget)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings with the defaults filled in (`of` takes a request's fields, None
    where the client sent none)."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = -1  # off
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None  # None: the rest of the context
    logprobs: int | None = None  # alternatives per token; None: no logprobs

    @classmethod
    def of(cls, temperature: float | None = None, top_p: float | None = None,
           top_k: int | None = None, stop: list[str] | None = None,
           presence_penalty: float | None = None, frequency_penalty: float | None = None,
           repetition_penalty: float | None = None, seed: int | None = None,
           max_new_tokens: int | None = None, logprobs: int | None = None) -> Sampling:
        return cls(DEFAULT_TEMPERATURE if temperature is None else temperature,
                   1.0 if top_p is None else top_p, -1 if top_k is None else top_k,
                   list(stop or []), presence_penalty or 0.0, frequency_penalty or 0.0,
                   repetition_penalty or 1.0, seed, max_new_tokens, logprobs)


Prompt = str | list[int]  # a text prompt, or token ids


@dataclass(frozen=True)
class Plan:
    """One request, as the pipeline runs it: `choices` generations, `n` per prompt (chat has
    one prompt: its `messages`; text completions one or more `prompts`)."""

    model: str
    request_id: str
    sampling: Sampling
    messages: list[dict[str, Any]] | None = None
    prompts: list[Prompt] = field(default_factory=list)
    n: int = 1
    echo: bool = False
    constraints: Constraints = field(default_factory=Constraints)
    prefix_keys: list[str] | None = None  # `prefix` dispatch: where the conversation is cached
    caller: Caller | None = None
    reasoning: ReasoningSettings | None = None

    @property
    def choices(self) -> int:
        return self.n * (1 if self.messages is not None else len(self.prompts))

    @property
    def accept(self) -> Accept | None:
        """Which workers can take the request (None: any worker of the model)."""
        return self.constraints.honoured_by if self.constraints.needs() else None

    def worker_params(self, choice: int) -> dict[str, Any]:
        """What our workers take for generation `choice` (0 .. choices-1: prompt `choice // n`,
        its `choice % n`th choice). With a seed, each choice of a prompt gets its own (seed,
        seed+1, ...) so they differ; each generation has its own request id."""
        j, i = divmod(choice, self.n)
        s = self.sampling
        rid = self.request_id if len(self.prompts) <= 1 else f"{self.request_id}-p{j}"
        out: dict[str, Any] = {
            "model": self.model, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": s.top_k, "stop": s.stop, "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "repetition_penalty": s.repetition_penalty,
            "seed": None if s.seed is None else s.seed + i, "delta": True,
            "request_id": f"{rid}-{i}" if self.n > 1 else rid,
        }
        if self.messages is not None:
            out["messages"] = self.messages
            # a reasoning model's reasoning comes apart from its answer (others ignore this)
            out["reasoning"] = (self.reasoning or NO_REASONING_SETTINGS).wire()
        else:
            prompt = self.prompts[j]
            out["prompt" if isinstance(prompt, str) else "prompt_token_ids"] = prompt
        out.update(max_new_tokens=s.max_new_tokens, echo=self.echo, logprobs=s.logprobs,
                   **self.constraints.params())
        return out
