"""Models on demand: declared models loaded when a request asks for them, each in its own worker
process under a per-host manager (`llmrelay host`) that owns a memory budget. See
docs/on-demand.md.

Plain Python (catalog, sizes, estimate, policy, view) is kept apart from what runs processes and
servers (procs, host, app, main), so the policy is tested with a fake clock and no server.
"""
