"""How fast can transformers decode SmolLM2 on this machine at all? The ceiling under issue 3's
8-client target, measured in process (no server, no batching manager).

The model (the same HF folder `bench_transformers.py` serves, fp32) decodes with its KV cache,
one token per sequence per step, for a static batch of each size: plain forward passes, the
least any engine built on transformers can do. Per batch size it prints the time per step, the
tokens/s that gives, how much of the step is matrix multiplication (`aten::mm`, from torch's
profiler over separate profiled steps), and the tokens/s the multiplications alone would
allow: no engine on this model and dtype goes faster on this machine.

    .venv/bin/python benchmarks/bench_hf_ceiling.py [--batch 1,8] [--steps 20] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed per batch size")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the worker's default "
                    "is the machine's cores)")
    args = ap.parse_args()

    import torch
    from fastchat_env import smollm2_hf
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    folder = smollm2_hf()
    print(f"loading {folder} ({args.dtype}, {args.threads} threads)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()

    rows = []
    for bs in [int(b) for b in args.batch.split(",")]:
        torch.manual_seed(0)
        ids = torch.randint(100, 1000, (bs, 40))
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

            def step() -> None:
                nonlocal cache, nxt
                o = model(nxt, cache=cache, use_cache=True)
                cache, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)

            for _ in range(3):
                step()
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step()
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::mm")
        per_step = statistics.median(times)
        share = mm / total if total else 0.0
        rows.append((bs, per_step * 1000, bs / per_step, share, bs / (per_step * share)))
        print(f"batch {bs}: done", flush=True)

    print()
    print("| batch | ms / step (median) | tok/s | matmul share of a step | tok/s if only the "
          "matmuls ran |")
    print("|---:|---:|---:|---:|---:|")
    for bs, ms, tps, share, ceiling in rows:
        print(f"| {bs} | {ms:.1f} | {tps:.0f} | {100 * share:.0f}% | {ceiling:.0f} |")


if __name__ == "__main__":
    main()
