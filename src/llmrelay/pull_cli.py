"""`llmrelay pull ORG/NAME[:QUANT]`: fetch a model from the Hugging Face hub (or HF_ENDPOINT's
mirror, or ModelScope) into the standard cache ahead of time, as a worker would fetch it when
started with that name: the same choice of files, disk check, resume and errors. A bar on a
terminal, percentage lines otherwise. An operator fills the cache this way before going
offline (HF_HUB_OFFLINE=1 then serves from it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from llmrelay.ondemand.sizes import fmt_bytes


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ORG/NAME, or ORG/NAME:QUANT for one quantization of a GGUF "
                   "repository (default: Q4_K_M, else the smallest)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")


class Bar:
    """One bar for the whole model (tqdm, which huggingface_hub brings)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.bar = None

    def __call__(self, p: object) -> None:
        from tqdm import tqdm

        from llmrelay.worker.hub import Progress

        assert isinstance(p, Progress)
        if self.bar is None:
            self.bar = tqdm(total=p.total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=self.what, file=sys.stderr)
        self.bar.update(p.done - self.bar.n)
        if p.finished:
            self.bar.close()


def run(args: argparse.Namespace) -> None:
    from llmrelay.worker import download, hub
    from llmrelay.worker.models import ModelNotFound, hub_ref, resolve

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ref = hub_ref(args.model)
    if ref is None:
        sys.exit(f"error: {args.model!r} is not a model's name on the hub (ORG/NAME[:QUANT]), or "
                 "it is a local path or bundled alias, which need no pull")
    download.progress_bars(False)  # one bar of ours, for the whole model
    report = Bar(str(ref)) if sys.stderr.isatty() else hub.LogProgress(str(ref), step=5)
    print(f"pulling {ref}{f' at {args.revision}' if args.revision else ''} from {hub.where()} "
          f"into {hub.cache_dir()}", file=sys.stderr)
    try:
        model = resolve(args.model, args.revision, report)
    except ModelNotFound as e:
        sys.exit(f"error: {e}")
    size = sum(f.stat().st_size for f in ([model.path] if model.path.is_file()
                                           else model.path.rglob("*")) if f.is_file())
    print(f"{ref}: {model.kind} model, {fmt_bytes(size)}, in the cache at {model.path}")
    print(f"serve it with: llmrelay worker --model-path {ref}"
          + (f" --revision {args.revision}" if args.revision else ""))
