"""Votes between two models' answers, kept in SQLite in the API server's data folder
(`votes.sqlite`, WAL mode, as usage.sqlite and responses.sqlite are), one row per vote: when,
which key (its name, never the secret; `anonymous` without keys), the two models, the winner
(FastChat's values: model_a, model_b, tie, tie (bothbad)), whether the names were hidden until
the vote, and both conversations, or only their SHA-256 hashes when prompt logging is off
(`--no-arena-prompt-log`).

`battles` reads them back in FastChat's battle-log shape (its `clean_battle_data` output, what
its `elo_analysis.py` reads). Database work runs on one thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrelay.api.database import open_database

SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    id TEXT PRIMARY KEY,
    tstamp REAL NOT NULL,          -- unix time of the vote
    key TEXT NOT NULL,             -- the API key's name, never the key; 'anonymous' without keys
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    winner TEXT NOT NULL,          -- model_a, model_b, tie, tie (bothbad)
    anony INTEGER NOT NULL,        -- 1: the names were hidden until the vote
    turn INTEGER NOT NULL,         -- user turns in the conversation
    conversation_a TEXT NOT NULL,  -- JSON messages; with logging off, {role, sha256} only
    conversation_b TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS votes_by_time ON votes (tstamp);
"""


@dataclass
class Vote:
    model_a: str
    model_b: str
    winner: str
    key: str
    anony: bool = False
    conversation_a: list[dict[str, Any]] = field(default_factory=list)
    conversation_b: list[dict[str, Any]] = field(default_factory=list)
    tstamp: float = 0.0
    id: str = ""


def hashed(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation with each message's content replaced by the SHA-256 of its JSON."""
    return [{"role": m.get("role", ""),
             "sha256": hashlib.sha256(json.dumps(m.get("content", ""), sort_keys=True,
                                                 ensure_ascii=False).encode()).hexdigest()}
            for m in conversation]


class VoteStore:
    """The votes (see the module docstring); `path` ":memory:" keeps nothing on disk."""

    def __init__(self, path: Path | str, log_prompts: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.log_prompts = log_prompts
        self.clock = clock
        self._db = open_database(path, SCHEMA)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="votes-db")

    def add_now(self, vote: Vote) -> Vote:
        """Store one vote (its id and time given here); with prompt logging off only the
        conversations' hashes are kept."""
        vote.id = vote.id or "vote_" + uuid.uuid4().hex
        vote.tstamp = vote.tstamp or self.clock()
        if not self.log_prompts:
            vote.conversation_a = hashed(vote.conversation_a)
            vote.conversation_b = hashed(vote.conversation_b)
        turn = sum(m.get("role") == "user" for m in vote.conversation_a)
        with self._lock:
            self._db.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                vote.id, vote.tstamp, vote.key, vote.model_a, vote.model_b, vote.winner,
                int(vote.anony), turn, json.dumps(vote.conversation_a, ensure_ascii=False),
                json.dumps(vote.conversation_b, ensure_ascii=False)))
        return vote

    def battles_now(self, since: float | None = None, until: float | None = None,
                    key: str | None = None) -> list[dict[str, Any]]:
        """The votes in FastChat's battle-log shape, oldest first."""
        where, args = [], []
        for clause, value in (("tstamp >= ?", since), ("tstamp < ?", until), ("key = ?", key)):
            if value is not None:
                where.append(clause)
                args.append(value)
        query = ("SELECT id, tstamp, key, model_a, model_b, winner, anony, turn, conversation_a, "
                 "conversation_b FROM votes")
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY tstamp, id", args).fetchall()
        return [{"question_id": r[0], "model_a": r[3], "model_b": r[4], "winner": r[5],
                 "judge": r[2], "conversation_a": json.loads(r[8]),
                 "conversation_b": json.loads(r[9]), "turn": r[7], "anony": bool(r[6]),
                 "language": "unknown", "tstamp": r[1]} for r in rows]

    def keys_now(self) -> list[str]:
        """The names of the keys that voted."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT key FROM votes ORDER BY key")]

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def add(self, vote: Vote) -> Vote:
        return await self._run(self.add_now, vote)  # type: ignore[no-any-return]

    async def battles(self, since: float | None = None, until: float | None = None,
                      key: str | None = None) -> list[dict[str, Any]]:
        return await self._run(self.battles_now, since, until, key)  # type: ignore[no-any-return]

    async def keys(self) -> list[str]:
        return await self._run(self.keys_now)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            self._db.close()
