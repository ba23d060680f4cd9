"""Command-line flags of the three processes, shared by `llmrelay ...` and the FastChat entry points.

FastChat's flag names are kept (`--controller-address`, `--model-names`, ...) so a FastChat
start script works after replacing `fastchat` with `llmrelay`. Defaults bind to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from llmrelay import fastchat_flags
from llmrelay.dispatch import METHODS
from llmrelay.protocol import DEFAULT_HEARTBEAT_INTERVAL
from llmrelay.worker.engines.llamacpp import speculate
from llmrelay.worker.engines.llamacpp.options import KV_CACHE_LAYOUTS

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    # httpx logs every request at INFO; heartbeats and table reads would drown the useful lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=port, help=f"port to listen on (default {port})")
    p.add_argument("--log-level", default=os.environ.get("LLMRELAY_LOG_LEVEL", "info"))
    p.add_argument("--ssl", action="store_true", help="serve HTTPS (SSL_KEYFILE, SSL_CERTFILE)")
    p.add_argument(
        "--registration-token",
        default=None,
        help="cluster secret required between controller, workers and API servers "
        "(default: env LLMRELAY_REGISTRATION_TOKEN; none: no check)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let open requests finish before ending them",
    )


def add_registry_args(p: argparse.ArgumentParser) -> None:
    """`--registry` and its credentials: the NATS registry (docs/several-hosts.md)."""
    g = p.add_argument_group("NATS registry (several hosts; default: the embedded controller)")
    g.add_argument("--registry", default=None, metavar="URLS",
                   help="NATS servers holding the registry, e.g. nats://h1:4222,nats://h2:4222 "
                   "(user:password@ in a URL works too); without it, the controller is the "
                   "registry")
    g.add_argument("--registry-user", default=None,
                   help="NATS user (default: env LLMRELAY_REGISTRY_USER)")
    g.add_argument("--registry-password", default=None,
                   help="NATS password (default: env LLMRELAY_REGISTRY_PASSWORD, which keeps "
                   "it out of the process list)")
    g.add_argument("--registry-token", default=None,
                   help="NATS token (default: env LLMRELAY_REGISTRY_TOKEN)")
    g.add_argument("--registry-tls-ca", default=None, help="CA file to verify the NATS servers")
    g.add_argument("--registry-tls-cert", default=None, help="client certificate (TLS)")
    g.add_argument("--registry-tls-key", default=None, help="client certificate's key (TLS)")
    g.add_argument("--registry-bucket", default="llmrelay",
                   help="the key-value bucket of this cluster (default llmrelay)")


def add_controller_args(p: argparse.ArgumentParser) -> None:
    _common(p, 21001)
    add_registry_args(p)
    p.add_argument(
        "--dispatch-method",
        choices=METHODS,
        default="shortest_queue",
        help="how a worker is picked among those serving a model",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        help="seconds between worker heartbeats; silent for 3 intervals means dropped",
    )


def _slowdown(text: str) -> float:
    value = float(text)
    if not value > 1.0:
        raise argparse.ArgumentTypeError("must be more than 1 (a prompt must progress)")
    return value


def add_worker_args(p: argparse.ArgumentParser, default_concurrency: int = 5) -> None:
    _common(p, 21002)
    add_registry_args(p)
    p.add_argument(
        "--worker-address",
        default=None,
        help="URL the controller and API servers use to reach this worker "
        "(default: http://HOST:PORT, with the outward address when HOST is 0.0.0.0)",
    )
    p.add_argument(
        "--controller-address",
        default="http://127.0.0.1:21001",
        help="controller URL; a comma-separated list registers with each (hot standby)",
    )
    p.add_argument(
        "--model-path",
        default="smollm2",
        help="a GGUF file, an HF folder, a bundled alias (smollm2, gemma3-270m), or a model's "
        "name on the Hugging Face hub, ORG/NAME[:QUANT], fetched into its cache first "
        "(docs/models-by-name.md)",
    )
    p.add_argument(
        "--revision", default=None,
        help="with a hub name: the branch, tag or commit to fetch (default: main)",
    )
    p.add_argument(
        "--model-names",
        default=None,
        help="comma-separated public names (default: derived from the model path)",
    )
    p.add_argument(
        "--engine", default="auto",
        choices=["auto", "llamacpp", "transformers", "openai", "synthetic"],
        help="synthetic: fixed text and no model, for router benchmarks and fault tests only",
    )
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "mps", "xpu", "npu"],
                   help="default: the best device present")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs to use (default: all / none)")
    p.add_argument("--gpus", default=None, help="sets CUDA_VISIBLE_DEVICES, e.g. 0,1")
    p.add_argument("--max-gpu-memory", default=None, help="per-GPU memory cap, e.g. 12GiB")
    p.add_argument("--load-8bit", action="store_true", help="8-bit quantization (transformers)")
    p.add_argument("--load-4bit", action="store_true", help="4-bit quantization (transformers)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--cpu-offloading", action="store_true")
    p.add_argument("--conv-template", default=None, help="FastChat name; see --chat-template")
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template file or a known name (chatml, gemma, llama3, plain); "
        "default: the model's own, else a known one for its architecture",
    )
    p.add_argument(
        "--reasoning-parser", default="auto",
        choices=["auto", "none", "deepseek_r1", "qwen3", "gpt_oss"],
        help="how the model marks its reasoning, so that it is returned apart from the answer "
        "(vLLM's names); auto: from the chat template; none: never split (docs/reasoning.md)",
    )
    p.add_argument(
        "--prefill-slowdown", type=_slowdown, default=2.0,
        help="llamacpp engine: while requests generate, a step that also reads a new prompt may "
        "take this many times as long as their tokens alone (default 2: their inter-token "
        "latency at most about doubles, and a long prompt takes about twice as long as alone; "
        "higher: prompts faster, streams stall longer; docs/benchmarks.md)",
    )
    p.add_argument(
        "--speculative", default="off", choices=speculate.MODES,
        help="llamacpp engine: speculative decoding. ngram: prompt lookup, the next tokens "
        "guessed from the prompt and the text so far and checked in the same batched step "
        "(greedy answers unchanged, sampled ones from the same distribution; faster where the "
        "answer copies its input: edits, quotes); draft: a small model of the same vocabulary "
        "(--draft-model-path) writes the guesses; off: none (the default; docs/speculative.md)",
    )
    p.add_argument("--draft-model-path", default=None,
                   help="--speculative draft: the draft model, a GGUF file or a bundled alias "
                   "with the target's vocabulary (refused at start otherwise)")
    p.add_argument("--num-speculative-tokens", type=int, default=speculate.DEFAULT_TOKENS,
                   help="llamacpp engine with --speculative: draft tokens per step at most "
                   f"(default {speculate.DEFAULT_TOKENS})")
    p.add_argument("--ngram-min", type=int, default=speculate.DEFAULT_NGRAM_MIN,
                   help="--speculative ngram: the shortest n-gram looked up "
                   f"(default {speculate.DEFAULT_NGRAM_MIN})")
    p.add_argument("--ngram-max", type=int, default=speculate.DEFAULT_NGRAM_MAX,
                   help="--speculative ngram: the longest n-gram looked up, tried first "
                   f"(default {speculate.DEFAULT_NGRAM_MAX})")
    p.add_argument("--context-length", type=int, default=None, help="context size (llama.cpp n_ctx)")
    p.add_argument("--n-threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--kv-cache", default=None, choices=KV_CACHE_LAYOUTS,
                   help="llamacpp engine KV cache layout: a stream per sequence (per-sequence, "
                   "the default: greedy answers the same alone and batched) or one pool for all "
                   "(unified: answers depend on the batch, and every step attends over the "
                   "cached prompts of idle slots too)")
    p.add_argument("--mmproj", default=None,
                   help="llamacpp engine: the projector GGUF of a vision model, so that it reads "
                   "images (default: an mmproj*.gguf file next to the model, if any; "
                   "docs/images.md)")
    p.add_argument(
        "--limit-worker-concurrency",
        type=int,
        default=default_concurrency,
        help="requests run at once; more wait in the queue",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=32,
        help="requests that may wait beyond those running; more are refused (the API answers "
        "429 when every worker of a model is full)",
    )
    p.add_argument("--stream-interval", type=int, default=1, help="tokens per stream frame")
    p.add_argument("--fair-sharing", choices=["on", "off"], default="on",
                   help="on: waiting requests are admitted by priority class, then the API key "
                   "with the least service so far; off: first come, first served")
    p.add_argument("--fair-reserve", type=int, default=1,
                   help="with fair sharing: places beyond --limit-worker-concurrency that only a "
                   "request whose API key has nothing running may take, so it starts at once "
                   "on a worker another key fills (the engine holds that many more sequences)")
    p.add_argument("--no-register", action="store_true", help="do not register with a controller")
    p.add_argument("--seed", type=int, default=None, help="default sampling seed")
    p.add_argument("--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_INTERVAL)
    p.add_argument("--embed-in-truncate", action="store_true", help="accepted for FastChat scripts")
    p.add_argument("--debug", action="store_true", help="accepted for FastChat scripts")
    fastchat_flags.add_args(p)  # FastChat flags we refuse with a clear message
    add_upstream_args(p)


def add_upstream_args(p: argparse.ArgumentParser) -> None:
    """The `openai` engine: a running OpenAI-compatible server, or one started as a child."""
    g = p.add_argument_group("upstream server (--engine openai)")
    g.add_argument("--upstream", default=None,
                   help="base URL of a running OpenAI-compatible server, e.g. "
                   "http://host:8000/v1 (implies --engine openai)")
    g.add_argument("--upstream-key", default=None,
                   help="API key sent to the upstream (default: env LLMRELAY_UPSTREAM_KEY)")
    g.add_argument("--upstream-model", default=None,
                   help="model id to ask the upstream for (default: the requested name if the "
                   "upstream serves it, else its first model)")
    g.add_argument("--upstream-timeout", type=float, default=600.0,
                   help="seconds an upstream request may wait for data")
    g.add_argument("--upstream-check-interval", type=float, default=2.0,
                   help="seconds between health checks (GET /models) of the upstream")
    g.add_argument("--managed", default=None, choices=["llama-cpp-server", "vllm"],
                   help="start this server as a child process and front it (implies "
                   "--engine openai); --model-path and the flags below are mapped to its flags")
    g.add_argument("--managed-args", default=None,
                   help="extra arguments for the managed server, passed as they are "
                   "(one shell-quoted string)")
    g.add_argument("--managed-port", type=int, default=None,
                   help="port of the managed server (default: a free one)")
    g.add_argument("--managed-start-timeout", type=float, default=900.0,
                   help="seconds the managed server may take to load")
    g.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="vLLM: GPUs one model is split over (default: --num-gpus)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM: fraction of GPU memory it may use (vLLM's default 0.9)")


def _json_or_csv(value: str) -> list[str]:
    """FastChat passes CORS lists as JSON (`'["*"]'`); a comma list or a bare `*` works too."""
    value = value.strip()
    if value.startswith("["):
        parsed = json.loads(value)
        return [str(v) for v in parsed]
    return [v.strip() for v in value.split(",") if v.strip()]


def add_api_args(p: argparse.ArgumentParser) -> None:
    _common(p, 8000)
    add_registry_args(p)
    p.add_argument("--dispatch-method", choices=METHODS, default=None,
                   help="with --registry: how a worker is picked (default: the controllers' "
                   "method, else shortest_queue); without it the controller's table says")
    p.add_argument(
        "--controller-address",
        default="http://127.0.0.1:21001",
        help="controller URL; a comma-separated list reads from whichever answers",
    )
    p.add_argument(
        "--api-keys",
        default=os.environ.get("LLMRELAY_API_KEYS"),
        help="comma-separated keys clients must send as Bearer (or env LLMRELAY_API_KEYS)",
    )
    p.add_argument(
        "--api-keys-file",
        default=os.environ.get("LLMRELAY_API_KEYS_FILE"),
        help="keys file (TOML: named, hashed keys with models, limits and a priority; made by "
        "`llmrelay keys add`), or one API key per line (FastChat's way); re-read on change",
    )
    p.add_argument(
        "--public-docs",
        action="store_true",
        help="keep /docs, /redoc and /openapi.json open to anyone when API keys are on (by "
        "default they need a valid key, like the API they describe)",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("LLMRELAY_DATA_DIR"),
        help="folder of this API server's data (responses.sqlite: stored Responses; usage.sqlite: "
        "usage per key; votes.sqlite: the web console's votes); default: api-HOST-PORT in the "
        "state folder (~/.local/state/llmrelay)",
    )
    p.add_argument(
        "--responses-max-mb",
        type=float,
        default=512.0,
        help="stored Responses kept in at most this many MiB; past it the oldest are evicted "
        "(default 512)",
    )
    p.add_argument(
        "--responses-max-age-days",
        type=float,
        default=30.0,
        help="stored Responses are deleted after this many days (default 30, as OpenAI)",
    )
    p.add_argument("--no-arena-prompt-log", dest="arena_prompt_log", action="store_false",
                   help="the web console's votes keep only SHA-256 hashes of the prompts and "
                   "answers, not their text (default: kept; docs/web-console.md)")
    p.add_argument("--host-admin-key", default=os.environ.get("LLMRELAY_ADMIN_KEY"),
                   help="the on-demand hosts' admin key (default: env LLMRELAY_ADMIN_KEY), for "
                   "the web console's load, unload and pin buttons")
    p.add_argument("--files-max-mb", type=float, default=200.0,
                   help="largest file an upload may hold, in MiB (default 200, as OpenAI's "
                   "batch input); see docs/batch-api.md")
    p.add_argument("--files-max-mb-per-key", type=float, default=2048.0,
                   help="all the files of one API key (batch outputs included) in at most "
                   "this many MiB; past it uploads are refused (default 2048)")
    p.add_argument("--max-open-batches", type=int, default=16,
                   help="batches one API key may have not yet ended (default 16)")
    # Tests only: how many seconds a batch's completion window of "24h" lasts.
    p.add_argument("--batch-window", type=float, default=86400.0, help=argparse.SUPPRESS)
    # Tests only: the shortest `expires_after` a file may ask, in seconds (OpenAI's: 3600); the
    # sweep of expired files runs every half of it (at most every 60 s).
    p.add_argument("--files-min-expiry", type=int, default=3600, help=argparse.SUPPRESS)
    # Tests only: the lengths of the limits' minute and day windows, in seconds.
    p.add_argument("--limit-windows", default=None, help=argparse.SUPPRESS)
    p.add_argument("--allowed-origins", type=_json_or_csv, default=["*"])
    p.add_argument("--allowed-methods", type=_json_or_csv, default=["*"])
    p.add_argument("--allowed-headers", type=_json_or_csv, default=["*"])
    p.add_argument("--allow-credentials", action="store_true")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="larger request bodies get 413 (default 4 MiB)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may take in all; then it is ended with a 504 or an error event",
    )
    p.add_argument(
        "--sse-keepalive",
        type=float,
        default=10.0,
        help="while a streamed request waits for a busy worker, send an SSE comment this "
        "often so proxies do not time the connection out",
    )
    p.add_argument(
        "--max-migrations",
        type=int,
        default=2,
        help="how often a started generation may move to another worker when its own fails "
        "mid-answer (continuation: the client sees one unbroken answer); 0: never",
    )
    p.add_argument(
        "--load-queue", type=int, default=64,
        help="requests that may wait for one model to load on demand; more get 429")
    p.add_argument(
        "--table-refresh",
        type=float,
        default=1.0,
        help="seconds between reads of the controller's worker table",
    )
    p.add_argument(
        "--model-grace", type=float, default=60.0,
        help="seconds a model whose workers all left the table (a restart) is answered with "
        "503 and Retry-After, not 404 (default 60)")
    p.add_argument(
        "--expect-models", default=None,
        help="comma-separated model names answered with 503 and Retry-After, not 404, whenever "
        "no worker serves them (`llmrelay up` passes the names its stack declares)")
    p.add_argument("--max-images-per-request", type=int, default=8,
                   help="images a request may hold, its whole conversation counted (default 8; "
                   "docs/images.md)")
    p.add_argument("--image-max-mb", type=float, default=10.0,
                   help="largest image a request may send or point to, in MiB (default 10)")
    p.add_argument("--image-max-pixels", type=int, default=25_000_000,
                   help="largest image in pixels (width x height, read from its header before "
                   "it is decoded; default 25,000,000)")
    p.add_argument("--image-fetch-timeout", type=float, default=10.0,
                   help="seconds to fetch one image URL, redirects included (default 10)")
    p.add_argument("--allow-private-image-urls", action="store_true",
                   help="fetch image URLs from loopback, private and link-local addresses too "
                   "(default: refused, as are redirects to them)")
    p.add_argument("--allowed-image-hosts", default=None,
                   help="comma-separated host names whose image URLs are fetched whatever "
                   "address they resolve to (e.g. an internal image server)")


def split_csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]
