"""Speculative decoding (`--speculative ngram|draft`) against the same engine without it.

Side by side in one run, in alternating rounds, the same greedy prompts through
(a) raw llama-cpp-python (`Llama.create_completion`, one request at a time: it does not batch),
(b) the worker's llama.cpp engine without speculation, (c) the same engine with `ngram`,
(d) with a draft model (`--draft-model-path`, default the bundled SmolLM2 as its own draft: a
functional check, not a speed claim, since such a draft costs as much as the target), the
worker's engine without its HTTP layer, each side of each round in a process of its own (see
`one_side`: two llama.cpp contexts run from two threads of one process slow each other), on
two task sets: edit tasks (rewrite a given 40-80 line code file or JSON document with one small
change; quote a given text) and free chat; 1 client and 8 clients (8 requests at once). The
first round also measures the verification cost on this machine: a step of k+1 rows of one
sequence against one of 1 row, and the ceiling that gives at the acceptance the edit tasks show;
and the edit prompts' own time (one new token each): drafts cannot speed up reading a prompt, so
the edit tasks' ceiling at one client is Amdahl's, from the share of (b)'s time the prompts take.

    .venv/bin/python benchmarks/bench_speculative.py [--rounds 2] [--tokens 128] [--n-threads 2]
        [--draft-model-path smollm2 | --no-draft] [--ngram-max 4]

The line before the last: `draft: ...` the same ratios for (d); the last line:
`speculative: edit 1c X.XXx, chat 1c Y.YYx, edit 8c Z.ZZx, chat 8c W.WWx` (tokens/s of (c)
over (b)).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from llmrelay.worker.engines.base import GenerationRequest
from llmrelay.worker.engines.llamacpp import Options, load
from llmrelay.worker.engines.llamacpp.speculate import Settings
from llmrelay.worker.models import resolve

CODE = "\n".join([
    "import json", "import sys", "from dataclasses import dataclass", "from pathlib import Path",
    "", "", "@dataclass", "class Item:", "    name: str", "    price: float", "    quantity: int",
    "", "    def cost(self) -> float:", "        return self.price * self.quantity", "", "",
    "def load(path: Path) -> list[Item]:", "    with path.open() as f:",
    "        data = json.load(f)", "    return [Item(**row) for row in data[\"items\"]]", "", "",
    "def total(items: list[Item]) -> float:", "    return sum(item.cost() for item in items)", "",
    "", "def cheapest(items: list[Item]) -> Item:",
    "    return min(items, key=lambda item: item.price)", "", "",
    "def report(items: list[Item]) -> str:", "    lines = [f\"{i.name}: {i.cost():.2f}\" for i in items]",
    "    lines.append(f\"total: {total(items):.2f}\")", "    return \"\\n\".join(lines)", "", "",
    "def main() -> int:", "    if len(sys.argv) != 2:", "        print(\"usage: order.py FILE\")",
    "        return 2", "    items = load(Path(sys.argv[1]))", "    print(report(items))",
    "    print(\"cheapest:\", cheapest(items).name)", "    return 0", "", "",
    "if __name__ == \"__main__\":", "    sys.exit(main())",
])
DOC = json.dumps({"service": "orders", "version": 3, "owner": {"name": "Ada", "team": "core"},
                  "endpoints": [{"path": f"/v1/{p}", "method": m, "auth": True, "timeout_s": 30}
                                for p, m in (("orders", "GET"), ("orders", "POST"),
                                             ("items", "GET"), ("refunds", "POST"))],
                  "limits": {"rps": 50, "burst": 100}}, indent=2)
TEXT = ("The lighthouse stood on the northern cape for two hundred years. Its keepers kept a log "
        "of every ship that passed, every storm, and every night the lamp failed. In the winter "
        "of 1881 the lamp failed for eleven nights in a row, and the keeper, a widow named "
        "Margaret Hale, rowed to the mainland twice for oil through a sea that had already "
        "taken three boats that year.")
EDIT = [
    "Rewrite this file with the function `total` renamed to `order_total` (and its uses). "
    "Output the whole file, nothing else.\n\n" + CODE,
    "Change the rate limit rps to 80 in this JSON document. Output the whole document, "
    "nothing else.\n\n" + DOC,
    "Add a docstring to `cheapest` in this file. Output the whole file.\n\n" + CODE,
    "Quote the passage below exactly, then say in one sentence who Margaret Hale was.\n\n" + TEXT,
]
CHAT = [
    "Tell me a story about a dragon who learns to cook.",
    "What are three good habits for a programmer? Explain each.",
    "Describe the water cycle for a ten-year-old.",
    "Write a short letter inviting a friend to a picnic.",
]
K = 8  # --num-speculative-tokens


def chat(engine: Any, text: str) -> list[int]:
    return engine.prompt_tokens(GenerationRequest(messages=[{"role": "user", "content": text}]))


def prompt_sets(engine: Any) -> dict[str, list[list[int]]]:
    return {"edit": [chat(engine, p) for p in EDIT], "chat": [chat(engine, p) for p in CHAT]}


async def run_engine(engine: Any, prompts: list[list[int]], clients: int, tokens: int
                     ) -> tuple[int, float]:
    """The prompts through `engine`, `clients` at a time: tokens generated, seconds."""
    queue = list(prompts)
    done = 0

    async def client() -> None:
        nonlocal done
        while queue:
            ids = queue.pop(0)
            req = GenerationRequest(prompt_token_ids=ids, max_new_tokens=tokens, temperature=0)
            async for c in engine.generate(req):
                if c.finish_reason:
                    done += c.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done, time.perf_counter() - t0


def run_raw(llm: Any, prompts: list[list[int]], tokens: int) -> float:
    done, t0 = 0, time.perf_counter()
    for ids in prompts:
        r = llm.create_completion(ids, max_tokens=tokens, temperature=0.0)
        done += r["usage"]["completion_tokens"]
    return done / (time.perf_counter() - t0)


def verify_cost(llm: Any, prompt: list[int], k: int, repeat: int = 20) -> tuple[float, float]:
    """Seconds of a step of 1 row and of k+1 rows of one sequence after `prompt` (median)."""
    llm.reset()
    llm.eval(prompt)
    base = llm.n_tokens
    extra = [prompt[i % len(prompt)] for i in range(k + 1)]
    one, many = [], []
    for _ in range(repeat):
        llm.n_tokens = base
        t0 = time.perf_counter()
        llm.eval(extra[:1])
        one.append(time.perf_counter() - t0)
        llm.n_tokens = base
        t0 = time.perf_counter()
        llm.eval(extra)
        many.append(time.perf_counter() - t0)
    return statistics.median(one), statistics.median(many)


def one_side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """One side (raw, off, ngram or draft) in this process, alone: every set at 1 and 8
    clients (raw: 1 client only, and with --verify the verification cost). Returns tokens/s
    per "set|clients", the draft tokens proposed and accepted per set, and the verification
    cost when measured.

    A process holds one side only: llama.cpp's CPU backend runs each calling thread's work on a
    thread team of its own (OpenMP), and once two contexts had run in one process from two
    threads (raw from the main thread, an engine from its scheduler), every later step of
    either ran about 25 % slower on this 2-core machine (raw alone 58 tokens/s, then beside an
    engine 36; two identical engines 54, then 41 and 42), which had made the worker look 0.6x
    raw and biased whichever side ran after another."""
    from llama_cpp import Llama

    path = resolve("smollm2").path
    out: dict[str, Any] = {"results": {}, "drafted": {}}
    if side == "raw":
        engine = load(Options(path, context_length=2048, n_threads=args.n_threads))
        sets = prompt_sets(engine)  # the engine's prompt tokens (its context never runs)
        engine.close()
        raw = Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=args.n_threads,
                    verbose=False)
        if args.verify:
            out["verify"] = verify_cost(raw, sets["edit"][0], K)
            raw.reset()
        for name, prompts in sets.items():
            out["results"][f"{name}|1"] = tps = run_raw(raw, prompts, args.tokens)
            print(f"{side} {name} 1c: {tps:.1f} tokens/s", file=sys.stderr, flush=True)
        raw.close()
        return out
    if side == "prompts":  # the edit prompts' own time: each with one new token
        engine = load(Options(path, context_length=2048, n_threads=args.n_threads, parallel=8))
        out["prompt_seconds"] = asyncio.run(run_engine(engine, prompt_sets(engine)["edit"], 1,
                                                       1))[1]
        engine.close()
        return out
    draft = resolve(args.draft_model_path).path if side == "draft" else None
    engine = load(Options(path, context_length=2048, n_threads=args.n_threads, parallel=8,
                          speculation=Settings(side, K, ngram_max=args.ngram_max,
                                               draft_model=draft)))
    for name, prompts in prompt_sets(engine).items():
        for clients in (1, 8):
            batch = prompts * (2 if clients == 8 else 1)
            before = list(engine.drafted)
            tokens, seconds = asyncio.run(run_engine(engine, batch, clients, args.tokens))
            tps = tokens / seconds
            if name == "edit" and clients == 1:
                out["edit_seconds"] = seconds
            got = out["drafted"].setdefault(name, [0, 0])
            for i in (0, 1):
                got[i] += engine.drafted[i] - before[i]
            out["results"][f"{name}|{clients}"] = tps
            print(f"{side} {name} {clients}c: {tps:.1f} tokens/s", file=sys.stderr, flush=True)
    engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="max new tokens per request")
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--draft-model-path", default="smollm2",
                    help="(d)'s draft model (default: SmolLM2 itself, a functional check)")
    ap.add_argument("--no-draft", action="store_true", help="leave (d) out")
    ap.add_argument("--ngram-max", type=int, default=Settings.ngram_max,
                    help="(c)'s --ngram-max (longest n-gram looked up)")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)  # raw side, round 1
    args = ap.parse_args()
    if args.side is not None:  # a child: one side, its results as JSON
        print(json.dumps(one_side(args, args.side)))
        return

    modes = ["off", "ngram"] + ([] if args.no_draft else ["draft"])
    draft = None if args.no_draft else resolve(args.draft_model_path).path
    if draft is not None:
        print(f"(d) draft model: {draft.name}")
    # Each side of each round in a process of its own (see one_side), in alternating order.
    results: dict[tuple[str, str, int], list[float]] = {}
    drafted = {(mode, name): [0, 0] for mode in modes[1:] for name in ("edit", "chat")}
    one = many = prompt_seconds = 0.0
    edit_seconds: list[float] = []  # (b)'s, edit tasks at one client
    sides = ["raw", *modes]
    for rnd in range(args.rounds):
        for side in (["prompts"] if rnd == 0 else []) + (sides if rnd % 2 == 0 else sides[::-1]):
            child = [sys.executable, __file__, "--side", side, "--tokens", str(args.tokens),
                     "--n-threads", str(args.n_threads), "--draft-model-path",
                     args.draft_model_path, "--ngram-max", str(args.ngram_max)]
            if side == "raw" and rnd == 0:
                child.append("--verify")
            done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
            got = json.loads(done.stdout.strip().splitlines()[-1])
            if "verify" in got:
                one, many = got["verify"]
                print(f"verification cost: 1 row {one * 1000:.1f} ms, {K + 1} rows "
                      f"{many * 1000:.1f} ms ({many / one:.2f}x a 1-row step for {K + 1} rows)")
            prompt_seconds = got.get("prompt_seconds", prompt_seconds)
            if side == "off":
                edit_seconds.append(got["edit_seconds"])
            for key, tps in got["results"].items():
                name, clients = key.split("|")
                results.setdefault((side, name, int(clients)), []).append(tps)
            for name, (p, a) in got["drafted"].items():
                if side != "off":
                    drafted[(side, name)][0] += p
                    drafted[(side, name)][1] += a
    for (mode, name), (proposed, accepted) in drafted.items():
        print(f"{mode} drafts, {name}: {accepted}/{proposed} accepted")

    d_head, d_line = (" (d) worker, draft | (d)/(b) |", "---|---|") if draft else ("", "")
    print("\n| task | clients | (a) raw llama-cpp-python | (b) worker, off | (c) worker, ngram "
          f"| (c)/(b) | (c)/(a) |{d_head}")
    print(f"|---|---|---|---|---|---|---|{d_line}")
    ratios, d_ratios = {}, {}
    for name in ("edit", "chat"):
        for clients in (1, 8):
            b = statistics.median(results[("off", name, clients)])
            c = statistics.median(results[("ngram", name, clients)])
            a = statistics.median(results[("raw", name, 1)]) if clients == 1 else None
            ratios[(name, clients)] = c / b
            d_cells = ""
            if draft:
                d = statistics.median(results[("draft", name, clients)])
                d_ratios[(name, clients)] = d / b
                d_cells = f" {d:.1f} | {d / b:.2f}x |"
            print(f"| {name} | {clients} | {f'{a:.1f}' if a else '-'} | {b:.1f} | {c:.1f} "
                  f"| {c / b:.2f}x | {f'{c / a:.2f}x' if a else '-'} |{d_cells}")
    # The ceiling at the edit tasks' acceptance: a draft of K tokens of which a fraction r is
    # accepted gives 1 + r * K tokens per verification step of K+1 rows. It bounds the decode
    # steps only: the prompts take as long with drafts as without, so the edit tasks' own
    # ceiling is Amdahl's, from the share of (b)'s time its prompts take.
    proposed, accepted = drafted[("ngram", "edit")]
    rate = accepted / proposed if proposed else 0.0
    per_step = 1 + rate * K
    step_ceiling = per_step * one / many
    print(f"ceiling at acceptance {rate:.2f} with {K} draft tokens: {per_step:.2f} tokens per "
          f"step of {many / one:.2f}x the cost: {step_ceiling:.2f}x")
    whole = statistics.median(edit_seconds)
    share = min(prompt_seconds / whole, 1.0)
    task_ceiling = 1 / (share + (1 - share) / step_ceiling)
    target = 1.8 if task_ceiling >= 1.8 else 0.85 * task_ceiling
    print(f"edit tasks at one client: prompts {prompt_seconds:.2f} s of (b)'s {whole:.2f} s "
          f"({share:.0%}), so their ceiling is {task_ceiling:.2f}x; target {target:.2f}x")
    if draft:
        print(f"draft ({draft.name}): edit 1c {d_ratios[('edit', 1)]:.2f}x, chat 1c "
              f"{d_ratios[('chat', 1)]:.2f}x, edit 8c {d_ratios[('edit', 8)]:.2f}x, chat 8c "
              f"{d_ratios[('chat', 8)]:.2f}x")
    print(f"speculative: edit 1c {ratios[('edit', 1)]:.2f}x, chat 1c {ratios[('chat', 1)]:.2f}x, "
          f"edit 8c {ratios[('edit', 8)]:.2f}x, chat 8c {ratios[('chat', 8)]:.2f}x")


if __name__ == "__main__":
    main()
