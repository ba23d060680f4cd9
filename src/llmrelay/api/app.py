"""The API server's app: builds the worker table, the controller feed, the transport to workers
(with the FastChat adapter), the access rules (API keys, limits, usage: access.py) and the
serving objects of the front doors; adds the middlewares (CORS, body limit, metrics and logs,
request ids) and mounts the routes (routes.py). `run` reads the flags, the keys and the data
folder (usage.sqlite)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from llmrelay.api import batch, errors, routes
from llmrelay.api.access import Access
from llmrelay.api.arena.ops import Sampler
from llmrelay.api.arena.routes import mount as mount_console
from llmrelay.api.arena.store import VoteStore
from llmrelay.api.auth import guard, may_load
from llmrelay.api.batch.execute import Doors
from llmrelay.api.batch.natsstore import NatsStore
from llmrelay.api.batch.state import BatchLimits
from llmrelay.api.batch.storage import LocalStore, Store
from llmrelay.api.batch.store import BatchStore
from llmrelay.api.body import CheckedRoute
from llmrelay.api.chat.serving import ChatServing
from llmrelay.api.completions.serving import CompletionServing
from llmrelay.api.embeddings.serving import EmbeddingServing
from llmrelay.api.fastchat import FastChatAdapter
from llmrelay.api.feed import ControllerFeed
from llmrelay.api.images import ImageFetcher, ImagePolicy
from llmrelay.api.keys import KeysFileError, KeyStore
from llmrelay.api.limits import Limiter, LimitStore, LocalLimits
from llmrelay.api.messages import errors as anthropic_errors
from llmrelay.api.messages.serving import MessagesServing
from llmrelay.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from llmrelay.api.models.serving import ModelServing
from llmrelay.api.observe import ObserveMiddleware
from llmrelay.api.ondemand.loads import Loads
from llmrelay.api.ondemand.middleware import OnDemandMiddleware
from llmrelay.api.pipeline import Limits, Pipeline
from llmrelay.api.registryfeed import RegistryFeed
from llmrelay.api.responses.serving import ResponsesServing
from llmrelay.api.responses.store import ResponseStore, SqliteResponseStore
from llmrelay.api.table import DEFAULT_GRACE, WorkerTable
from llmrelay.api.tokenize.serving import TokenServing
from llmrelay.api.transport import WorkerTransport
from llmrelay.api.usage import UsageStore
from llmrelay.config import split_csv
from llmrelay.metrics import ApiMetrics
from llmrelay.registry.base import RegistryConfig, RegistryError, TableFeed, public_address
from llmrelay.security import auth_headers, token_from

log = logging.getLogger("llmrelay.api")


def create_app(
    controllers: list[str],
    keys: KeyStore | None = None,
    allowed_origins: list[str] | None = None,
    allowed_methods: list[str] | None = None,
    allowed_headers: list[str] | None = None,
    allow_credentials: bool = False,
    table_refresh: float = 1.0,
    registration_token: str | None = None,
    max_request_bytes: int = 4 * 1024 * 1024,
    request_timeout: float = 600.0,
    sse_keepalive: float = 10.0,
    max_migrations: int = 2,
    responses_store: ResponseStore | None = None,
    usage: UsageStore | None = None,
    limits: LimitStore | None = None,
    registry: RegistryConfig | None = None,
    address: str = "",
    dispatch_method: str | None = None,
    load_queue: int = 64,
    model_grace: float = DEFAULT_GRACE,
    expected_models: Iterable[str] = (),
    public_docs: bool = False,
    batch_store: Store | None = None,
    batch_limits: BatchLimits | None = None,
    votes: VoteStore | None = None,
    host_admin_key: str | None = None,
    image_policy: ImagePolicy | None = None,
) -> FastAPI:
    """The app; `keys` (none: no API keys), `usage` (where usage is counted), `limits` (the
    counters of the keys' limits; default: in this process) and `responses_store` (stored
    Responses; default: in memory, lost on exit) come from `run`; `public_docs`: /docs, /redoc
    and /openapi.json open to anyone even with keys on; `batch_store` (files and batches;
    default: in memory) and `batch_limits` for the Files and Batch APIs; `votes`: the web
    console's votes (default: in memory); `host_admin_key`: for its load and unload buttons;
    `image_policy`: the limits on images in requests (docs/images.md)."""
    headers = auth_headers(registration_token)
    table = WorkerTable(controllers, grace=model_grace, expected=expected_models)
    feed: TableFeed = (RegistryFeed(table, registry, address, dispatch_method)
                       if registry is not None else
                       ControllerFeed(table, refresh=table_refresh, headers=headers))
    side = httpx.AsyncClient(  # side questions to workers (FastChat workers' templates, ...)
        timeout=httpx.Timeout(connect=3.0, read=600.0, write=30.0, pool=30.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        headers=headers,
    )
    transport = WorkerTransport(table, side, FastChatAdapter(side), headers=headers,
                                max_migrations=max_migrations)
    images = ImageFetcher(image_policy)
    pipeline = Pipeline(transport, Limits(request_timeout, sse_keepalive), images)
    stored = responses_store or SqliteResponseStore(":memory:")
    files = batch_store or LocalStore(BatchStore(":memory:"))
    limits_of_batches = batch_limits or BatchLimits()
    metrics = ApiMetrics(table)
    access = Access(keys or KeyStore(), limits, usage, metrics)
    loads = Loads(table, side, feed.fetch_once, load_queue)  # models on demand
    table.declared_names = lambda: loads.declared().keys()
    voted = votes or VoteStore(":memory:")
    sampler = Sampler(table, metrics)  # the operations view's charts

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await feed.fetch_once()
        feed.start()
        await runner.start()  # batches a restart interrupted go on
        sampler.start()
        yield
        await sampler.aclose()
        await runner.aclose()
        await feed.aclose()
        await transport.aclose()
        await images.aclose()
        stored.close()  # (the runner closed the files' store)
        voted.close()
        if usage is not None:
            usage.close()

    # the docs' routes are routes.py's, guarded by the keys like the API they describe
    app = FastAPI(title="llmrelay OpenAI-compatible API", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    errors.install(app, {routes.MESSAGES: anthropic_errors.response})
    app.router.route_class = CheckedRoute  # bodies nested too deeply, lone surrogates: 400s

    # Innermost: a request for a model loaded on demand waits here for its load.
    app.add_middleware(OnDemandMiddleware, loads=loads, authorized=may_load(access),
                       keepalive=sse_keepalive)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=allowed_origins or ["*"],
        allow_methods=allowed_methods or ["*"],
        allow_headers=allowed_headers or ["*"],
        allow_credentials=allow_credentials,
        expose_headers=["X-Request-ID"],
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes,  # uploads: their own
                       paths={"/v1/files": limits_of_batches.max_file_bytes + 64 * 1024})
    # inside RequestIdMiddleware; ends each request's accounting (access.finish)
    app.add_middleware(ObserveMiddleware, metrics=metrics, finish=access.finish)
    app.add_middleware(RequestIdMiddleware)
    routes.mount(app, guard(access), feed, metrics,
                 chat=ChatServing(table, pipeline), completions=CompletionServing(table, pipeline),
                 embeddings=EmbeddingServing(table, transport),
                 models=ModelServing(table, loads.declared),
                 messages=MessagesServing(table, pipeline, transport),
                 tokens=TokenServing(table, transport),
                 responses=ResponsesServing(table, pipeline, stored), access=access,
                 public_docs=public_docs)
    runner = batch.mount(app, guard(access), table, Doors(
        ChatServing(table, pipeline), CompletionServing(table, pipeline),
        EmbeddingServing(table, transport), ResponsesServing(table, pipeline, stored)),
        files, limits_of_batches, usage, me=address or "")
    mount_console(app, guard(access), access, voted, sampler, loads, side, host_admin_key)
    return app


def image_policy(args: argparse.Namespace) -> ImagePolicy:
    """The `--image-*` flags' limits on images in requests."""
    return ImagePolicy(
        max_images=args.max_images_per_request, max_bytes=int(args.image_max_mb * 1024 * 1024),
        max_pixels=args.image_max_pixels, timeout=args.image_fetch_timeout,
        allow_private=args.allow_private_image_urls,
        allowed_hosts=frozenset(h.lower().rstrip(".") for h in split_csv(
            args.allowed_image_hosts)))


def data_dir(args: argparse.Namespace) -> Path:
    """`--data-dir`, else a folder per API server in the state folder: `api-HOST-PORT`."""
    if args.data_dir:
        return Path(args.data_dir).expanduser()
    from llmrelay.stackstate import state_dir

    host = "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in args.host or "all")
    return state_dir() / f"api-{host}-{args.port}"


def responses_store(args: argparse.Namespace, folder: Path) -> SqliteResponseStore:
    """Stored Responses in `responses.sqlite` in the data folder, within the flags' limits."""
    try:
        return SqliteResponseStore(folder / "responses.sqlite",
                                   max_bytes=int(args.responses_max_mb * 1024 * 1024),
                                   max_age=args.responses_max_age_days * 86400.0)
    except Exception as e:  # sqlite3.Error, OSError
        raise SystemExit(f"error: cannot open the responses database in {folder} ({e}); "
                         "choose another folder with --data-dir") from e


def batch_store(args: argparse.Namespace, folder: Path, registry: RegistryConfig | None,
                address: str) -> tuple[Store, BatchLimits]:
    """Files and batches in the responses' database (`responses.sqlite`), the files' bytes in
    `files/` beside it; with the NATS registry, in its JetStream (every API server shares
    them); the limits of the flags."""
    mib = 1024 * 1024
    limits = BatchLimits(int(args.files_max_mb * mib), int(args.files_max_mb_per_key * mib),
                         args.max_open_batches, args.batch_window, args.files_min_expiry)
    if registry is not None:
        return NatsStore(registry, folder / "files", f"llmrelay API server {address}"), limits
    try:
        store = BatchStore(folder / "responses.sqlite")
    except Exception as e:  # sqlite3.Error, OSError
        raise SystemExit(f"error: cannot open the files and batches in {folder} ({e}); "
                         "choose another folder with --data-dir") from e
    return LocalStore(store), limits


def key_store(args: argparse.Namespace) -> KeyStore:
    """The keys of `--api-keys` and `--api-keys-file` (a keys file, or FastChat's one key per
    line); exits with the reason when the file cannot be used."""
    try:
        keys = KeyStore(split_csv(args.api_keys), args.api_keys_file)
    except OSError as e:
        raise SystemExit(f"error: cannot read --api-keys-file {args.api_keys_file}: "
                         f"{e.strerror}") from e
    except KeysFileError as e:
        raise SystemExit(f"error: --api-keys-file: {e}") from e
    if args.api_keys_file and not keys.keys():
        log.warning("--api-keys-file %s holds no key yet: every request is refused until keys "
                    "are added (`llmrelay keys add NAME --file %s`; read again on change)",
                    args.api_keys_file, args.api_keys_file)
    return keys


def limiter(args: argparse.Namespace, usage: UsageStore) -> LocalLimits:
    """The limits' counters, with today's tokens per key from the usage store already counted
    (so a restart does not hand out a fresh day's tokens)."""
    try:
        minute, day = (float(x) for x in (args.limit_windows or "60,86400").split(","))
    except ValueError:
        raise SystemExit("error: --limit-windows takes MINUTE,DAY in seconds") from None
    counters = Limiter(minute=minute, day=day)
    since_midnight = time.time() % 86400.0
    for name, tokens in usage.today().items():
        counters.seed_daily(name, tokens, since_midnight)
    return LocalLimits(counters)


def run(args: argparse.Namespace) -> None:
    from llmrelay.config import setup_logging
    from llmrelay.runtime import serve, warn_public_bind

    setup_logging(args.log_level)
    keys = key_store(args)
    folder = data_dir(args)
    stored = responses_store(args, folder)
    try:
        votes = VoteStore(folder / "votes.sqlite", log_prompts=args.arena_prompt_log)
    except Exception as e:  # sqlite3.Error, OSError
        raise SystemExit(f"error: cannot open the votes database in {folder} ({e}); choose "
                         "another folder with --data-dir") from e
    try:
        usage = UsageStore(folder / "usage.sqlite")
    except Exception as e:  # sqlite3.Error, OSError
        raise SystemExit(f"error: cannot open the usage database in {folder} ({e}); choose "
                         "another folder with --data-dir") from e
    warn_public_bind(args.host, "the API server", protected=keys.enabled)
    try:
        registry = RegistryConfig.from_args(args)
    except RegistryError as e:
        raise SystemExit(f"error: {e}") from e
    address = public_address(args.host, args.port, registry, args.ssl)
    files, limits_of_batches = batch_store(args, folder, registry, address)
    app = create_app(
        split_csv(args.controller_address), keys, args.allowed_origins, args.allowed_methods,
        args.allowed_headers, args.allow_credentials, args.table_refresh,
        token_from(args.registration_token, args.controller_address), args.max_request_bytes,
        args.request_timeout,
        args.sse_keepalive, args.max_migrations,
        responses_store=stored,
        usage=usage,
        limits=limiter(args, usage),
        registry=registry, address=address,
        dispatch_method=getattr(args, "dispatch_method", None),
        load_queue=args.load_queue,
        model_grace=args.model_grace,
        expected_models=split_csv(args.expect_models),
        public_docs=args.public_docs,
        batch_store=files,
        batch_limits=limits_of_batches,
        votes=votes,
        host_admin_key=args.host_admin_key,
        image_policy=image_policy(args),
    )
    n = len(keys.keys())
    log.info("OpenAI-compatible API on http://%s:%d/v1 (%s); usage kept in %s; stored "
             "responses in %s", args.host, args.port, f"{n} API key{'s' if n != 1 else ''} "
             "required" if keys.enabled else "no API keys", usage.path, stored.path)
    serve(app, args.host, args.port, args.log_level, args.ssl, args.shutdown_timeout)
