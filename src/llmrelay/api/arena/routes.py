"""The web console's routes, a few lines each over the vote store, the ranking and the sampler:

- `POST /api/arena/votes`: one vote (any key, for models it may use).
- `GET /api/arena/leaderboard?since=&until=&key=`: models ranked by Bradley-Terry with 95%
  bootstrap intervals, votes, wins, losses, ties, win rates.
- `GET /api/arena/battles?since=&until=&key=`: the votes as JSONL in FastChat's battle-log shape.
  With keys on, a key that is not an admin key sees only its own votes (`key` is ignored).
- `GET /api/ops/series?since=T`, `GET /api/ops/keys`, `GET /api/ops/models`, `POST
  /api/ops/models/{load|unload|pin|unpin}`: the operations view (admin keys only when keys are
  on); the actions go to the model's host's admin endpoints with `--host-admin-key`.
"""

from __future__ import annotations

import calendar
import json
import time
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.params import Depends
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from llmrelay.api.access import ANONYMOUS, Access, allowed_models
from llmrelay.api.arena import rating
from llmrelay.api.arena.ops import Sampler
from llmrelay.api.arena.store import Vote, VoteStore
from llmrelay.api.auth import caller, operator_guard
from llmrelay.api.errors import APIError
from llmrelay.api.ondemand.loads import Loads
from llmrelay.api.usage import utc_day
from llmrelay.ondemand.view import host_memory

MAX_TURNS = 200


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_a: str = Field(min_length=1, max_length=256)
    model_b: str = Field(min_length=1, max_length=256)
    winner: Literal["model_a", "model_b", "tie", "tie (bothbad)"]
    anony: bool = False
    conversation_a: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_TURNS)
    conversation_b: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_TURNS)


def when(value: str | None, param: str) -> float | None:
    """A time filter: unix seconds, or a UTC date YYYY-MM-DD (its midnight)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%d")))
    except ValueError:
        raise APIError(400, f"{param} must be unix seconds or a date, YYYY-MM-DD (UTC).",
                       param=param, code="invalid_value") from None


def mount(app: FastAPI, guarded: list[Depends], access: Access, votes: VoteStore,
          sampler: Sampler, loads: Loads, client: httpx.AsyncClient,
          host_admin_key: str | None = None) -> None:
    """Add the console's routes to `app`; `guarded` are the dependencies that check API keys."""

    def whose(request: Request, key: str | None) -> str | None:
        """The key filter: any for an admin (or without keys), else the caller's own."""
        k = caller(request)
        if k is None or k.admin:
            return key or None
        return k.name

    @app.post("/api/arena/votes", dependencies=guarded)
    async def add_vote(request: Request, body: VoteRequest) -> Any:
        if body.model_a == body.model_b:
            raise APIError(400, "model_a and model_b must be two different models.",
                           param="model_b", code="invalid_value")
        allowed = allowed_models(caller(request))
        for param, model in (("model_a", body.model_a), ("model_b", body.model_b)):
            if allowed is not None and not allowed(model):
                raise APIError(404, f"The model '{model}' does not exist.", param=param,
                               code="model_not_found")
        k = caller(request)
        vote = await votes.add(Vote(body.model_a, body.model_b, body.winner,
                                    k.name if k is not None else ANONYMOUS, body.anony,
                                    body.conversation_a, body.conversation_b))
        return {"object": "arena.vote", "id": vote.id, "model_a": vote.model_a,
                "model_b": vote.model_b, "winner": vote.winner, "tstamp": vote.tstamp}

    @app.get("/api/arena/leaderboard", dependencies=guarded)
    async def leaderboard(request: Request, since: str | None = None, until: str | None = None,
                          key: str | None = None) -> Any:
        of_key = whose(request, key)
        battles = await votes.battles(when(since, "since"), when(until, "until"), of_key)
        rows = rating.leaderboard(rating.Battle(b["model_a"], b["model_b"], b["winner"])
                                  for b in battles)
        k = caller(request)
        return {"object": "arena.leaderboard", "votes": len(battles), "key": of_key,
                "models": rows, "keys": await votes.keys() if k is None or k.admin else []}

    @app.get("/api/arena/battles", dependencies=guarded)
    async def battles(request: Request, since: str | None = None, until: str | None = None,
                      key: str | None = None) -> Any:
        rows = await votes.battles(when(since, "since"), when(until, "until"),
                                   whose(request, key))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(text, media_type="application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="battles.jsonl"'})

    ops = operator_guard(access, "the operations view")

    @app.get("/api/ops/series", dependencies=ops)
    async def series(since: float = 0.0) -> Any:
        return {"interval": sampler.interval, "samples": sampler.since(since)}

    @app.get("/api/ops/keys", dependencies=ops)
    async def keys_today() -> Any:
        """Each key's usage today (UTC), its limits, and its 429s today (by limit)."""
        day = utc_day()
        rows = await access.usage.report_async(day) if access.usage is not None else []
        refused = await access.usage.refusals_async(day) if access.usage is not None else {}
        out: dict[str, dict[str, Any]] = {}

        def row_of(name: str) -> dict[str, Any]:
            return out.setdefault(name, {"key": name, "requests": 0, "prompt_tokens": 0,
                                         "completion_tokens": 0, "models": {}})

        for r in rows:
            row = row_of(r["key"])
            row["requests"] += r["requests"]
            row["prompt_tokens"] += r["prompt_tokens"]
            row["completion_tokens"] += r["completion_tokens"]
            row["models"][r["model"]] = r["requests"]
        for k in access.keys.keys() if access.enabled else ():
            row_of(k.name)["limits"] = {n: getattr(k, n) for n in (
                "requests_per_minute", "tokens_per_minute", "concurrent", "tokens_per_day")
                if getattr(k, n) is not None}
        for name in refused:
            row_of(name)
        for name, row in out.items():
            row["rate_limited"] = refused.get(name, {})
        return {"day": day, "keys": sorted(out.values(), key=lambda r: r["key"])}

    @app.get("/api/ops/models", dependencies=ops)
    async def declared() -> Any:
        hosts = host_memory((w.name, w.status) for w in loads.table.workers.values())
        return {"admin_buttons": bool(host_admin_key), "models": [
            {"model": d.name, "state": d.state, "bytes": d.bytes, "pin": d.pin, "load": d.load,
             "error": d.error, "download": d.download, "host": d.host}
            for d in sorted(loads.declared().values(), key=lambda d: d.name)],
            "hosts": [{"host": h.host, "budget_bytes": h.budget_bytes, "held_bytes": h.held_bytes}
                      for h in hosts]}

    @app.post("/api/ops/models/{action}", dependencies=ops)
    async def model_action(action: str, body: dict[str, Any]) -> Any:
        if action not in ("load", "unload", "pin", "unpin"):
            raise APIError(404, f"Unknown path /api/ops/models/{action}.")
        d = loads.declared().get(str(body.get("model", "")))
        if d is None:
            raise APIError(404, "No host declares this model.", param="model",
                           code="model_not_found")
        if not host_admin_key:
            raise APIError(403, "This API server has no host admin key: start it with "
                           "--host-admin-key (or LLMRELAY_ADMIN_KEY) to load, unload and pin "
                           "from the page.", code="admin_disabled")
        ask = {"model": d.name, "wait": False} if action == "load" else {"model": d.name}
        r = await client.post(f"{d.host}/admin/{action}", json=ask,
                              headers={"Authorization": f"Bearer {host_admin_key}"}, timeout=30)
        return Response(r.content, status_code=r.status_code, media_type="application/json")
