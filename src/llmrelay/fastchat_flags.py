"""FastChat model-worker flags llmrelay does not support: known to the parser, refused clearly.

A FastChat start script may pass GPTQ/AWQ/ExLlama/xFasterTransformer options (`--revision` is
a real flag now: config.py, docs/models-by-name.md).
Rather than argparse's generic "unrecognized arguments", the worker parser knows these flags
and `check` says what each means here: a flag that asks for a feature (a GPTQ checkpoint,
ExLlama) is an error with what to do instead; a tuning value that only matters
with such a feature (e.g. `--gptq-wbits 16`, FastChat's default) is ignored with a warning.
docs/migrating-from-fastchat.md lists them.
"""

from __future__ import annotations

import argparse

# flag -> (argparse kwargs, is it a request for the feature (error) or a tuning value (warning))
_UNSUPPORTED: dict[str, tuple[dict, bool]] = {
    "--gptq-ckpt": ({}, True),
    "--gptq-wbits": ({"type": int}, False),
    "--gptq-groupsize": ({"type": int}, False),
    "--gptq-act-order": ({"action": "store_true"}, True),
    "--awq-ckpt": ({}, True),
    "--awq-wbits": ({"type": int}, False),
    "--awq-groupsize": ({"type": int}, False),
    "--enable-exllama": ({"action": "store_true"}, True),
    "--exllama-max-seq-len": ({"type": int}, False),
    "--exllama-gpu-split": ({}, False),
    "--exllama-cache-8bit": ({"action": "store_true"}, False),
    "--enable-xft": ({"action": "store_true"}, True),
    "--xft-max-seq-len": ({"type": int}, False),
    "--xft-dtype": ({}, False),
}

_WHY = {
    "gptq": "GPTQ checkpoints are not loaded: use a GGUF quantization (llamacpp engine) or serve "
            "the GPTQ model with vLLM",
    "awq": "AWQ checkpoints are not loaded: use a GGUF quantization (llamacpp engine) or serve "
           "the AWQ model with vLLM",
    "exllama": "ExLlamaV2 is not an llmrelay engine: use the llamacpp engine with a GGUF file, "
               "or vLLM",
    "xft": "xFasterTransformer is not an llmrelay engine: use the llamacpp engine (fast on CPU)",
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_args(p: argparse.ArgumentParser) -> None:
    """Add the unsupported FastChat flags (hidden from --help; see the migration doc)."""
    g = p.add_argument_group("FastChat flags not supported (see docs/migrating-from-fastchat.md)")
    for flag, (kw, _) in _UNSUPPORTED.items():
        g.add_argument(flag, dest=f"fastchat_{_dest(flag)}", default=None, help=argparse.SUPPRESS,
                       **kw)


def check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the unsupported FastChat flags that were given."""
    errors: list[str] = []
    warnings: list[str] = []
    for flag, (_, feature) in _UNSUPPORTED.items():
        value = getattr(args, f"fastchat_{_dest(flag)}", None)
        if value in (None, False):
            continue
        family = next(k for k in _WHY if k in flag)
        if feature:
            errors.append(f"{flag} is not supported: {_WHY[family]}")
        else:
            warnings.append(f"{flag} {value} ignored: it only tunes a feature llmrelay does not "
                            f"have ({_WHY[family]})")
    return errors, warnings
