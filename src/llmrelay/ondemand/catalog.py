"""The models a host declares: one `ModelSpec` per model, from the stack file's on-demand
`[[worker]]` tables, a catalog file, or a models folder (`--models-dir`).

A spec is a worker's own flags (checked by the worker's parser, so a typo stops the host before
anything starts) plus what the manager decides: `load` (`on-demand`: on the first request;
`manual`: only by an admin), `pin` (loaded at start, never evicted), `idle_unload` (unload after
that long unused) and `keep_alive_max` (the ceiling of a client's `keep_alive` hint).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmrelay.ondemand.sizes import parse_duration
from llmrelay.worker.models import ModelNotFound, NotCached, ResolvedModel, hub_ref, resolve

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

LOAD_MODES = ("always", "on-demand", "manual")
MANAGER_KEYS = ("load", "pin", "idle_unload", "keep_alive_max")
# Chosen by the host for each worker it starts, never by the spec.
HOST_CHOSEN = ("port", "host", "worker_address", "controller_address", "no_register",
               "registration_token", "heartbeat_interval")
_SPLIT_PART = re.compile(r"-0*1-of-\d+$")  # llama.cpp's split GGUF: name-00001-of-00003.gguf
_LATER_PART = re.compile(r"-\d+-of-\d+$")


class CatalogError(ValueError):
    """A declaration the host cannot use; the message names the model and the key."""


@dataclass
class ModelSpec:
    name: str
    flags: dict[str, Any]  # the worker's flags as stack-file keys: model_path, context_length, ...
    load: str = "on-demand"
    pin: bool = False
    idle_unload: float | None = None  # seconds unused before unloading; None: never
    keep_alive_max: float | None = None  # ceiling of clients' keep_alive hints; None: host's
    path: str = ""  # the resolved file or folder ("" for a hub model not fetched yet)
    kind: str = ""  # gguf or hf; "hub" for a hub model not fetched yet (fetching.py)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> str:
        return str(self.flags.get("model_path", self.path))

    def argv(self) -> list[str]:
        """The worker's flags for this model (the host adds port, controller and heartbeat)."""
        flags = dict(self.flags)
        flags.setdefault("model_names", [self.name])
        return to_argv(flags, f"model {self.name}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)


def to_argv(section: dict[str, Any], where: str) -> list[str]:
    """Stack-file keys -> flags: `key = v` is `--key v`, true is `--key`, a list is comma-joined."""
    argv: list[str] = []
    for key, value in section.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, (str, int, float)):
            argv += [flag, str(value)]
        else:
            raise CatalogError(f"{where}: {key} must be a string, number, boolean or list")
    return argv


def parse_flags(add: Callable[[argparse.ArgumentParser], Any], argv: list[str],
                where: str) -> argparse.Namespace:
    """`argv` as the parser `add` builds reads it; CatalogError (naming `where`) for a bad value
    or an unknown setting. The stack file's sections and the catalog's models share it."""
    parser = argparse.ArgumentParser(prog=where, add_help=False, exit_on_error=False,
                                     allow_abbrev=False)
    add(parser)
    try:
        args, unknown = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise CatalogError(f"{where}: {e}") from e
    if unknown:
        raise CatalogError(f"{where}: unknown setting "
                           f"{unknown[0].lstrip('-').replace('-', '_')!r}")
    return args


def worker_args(spec: ModelSpec) -> argparse.Namespace:
    """The spec's flags as `llmrelay worker` reads them (CatalogError for an unknown key)."""
    from llmrelay.config import add_worker_args

    return parse_flags(add_worker_args, spec.argv(), f"model {spec.name}")


def is_managed(entry: dict[str, Any]) -> bool:
    """Whether a stack-file `[[worker]]` table is for the host (on-demand, manual or pinned)."""
    load = entry.get("load", "always")
    return load != "always" or bool(entry.get("pin"))


def spec_from_entry(entry: dict[str, Any], where: str) -> ModelSpec:
    """A spec from a stack-file `[[worker]]` table or a catalog `[[model]]` table."""
    entry = dict(entry)
    load = entry.pop("load", "on-demand")
    if load not in LOAD_MODES:
        raise CatalogError(f"{where}: load must be one of {', '.join(LOAD_MODES)}, not {load!r}")
    if load == "always":
        load = "on-demand"  # pinned: loaded at start by the host
    pin = entry.pop("pin", False)
    if not isinstance(pin, bool):
        raise CatalogError(f"{where}: pin must be true or false")
    try:
        idle = parse_duration(entry.pop("idle_unload", None))
        keep = parse_duration(entry.pop("keep_alive_max", None))
    except ValueError as e:
        raise CatalogError(f"{where}: {e}") from e
    for key in HOST_CHOSEN:
        if key in entry:
            raise CatalogError(f"{where}: {key} is chosen by the host for models it loads on "
                               "demand; remove it")
    path = str(entry.get("model_path", "smollm2"))
    entry["model_path"] = path
    ref = hub_ref(path)
    if ref is not None:  # a hub name: declared at once, fetched when first wanted
        try:
            model = resolve(path, entry.get("revision"), fetch=False)
        except NotCached:
            model = ResolvedModel(Path(""), "hub", ref.name, hub=str(ref))
    else:
        model = _resolve(path, where)
    names = entry.get("model_names")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    name = names[0] if names else model.default_name
    spec = ModelSpec(name=name, flags=entry, load=load, pin=pin, idle_unload=idle,
                     keep_alive_max=keep, path=str(model.path) if model.kind != "hub" else "",
                     kind=model.kind)
    worker_args(spec)  # refuse unknown keys and bad values now
    return spec


def _resolve(path: str, where: str) -> ResolvedModel:
    try:
        return resolve(path)
    except ModelNotFound as e:
        raise CatalogError(f"{where}: {e}") from e


def scan_models_dir(folder: str | Path, defaults: dict[str, Any] | None = None) -> list[ModelSpec]:
    """Every `.gguf` file (the first part of a split one) and every HF folder (with
    config.json) in `folder`, named after the file or folder, loaded on demand. `defaults`: flags
    and manager keys every one of them gets."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CatalogError(f"--models-dir {folder}: not a folder")
    specs = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() == ".gguf":
            if _LATER_PART.search(p.stem) and not _SPLIT_PART.search(p.stem):
                continue
            name = _SPLIT_PART.sub("", p.stem)
        elif p.is_dir() and ((p / "config.json").exists() or len(list(p.glob("*.gguf"))) == 1):
            name = p.name
        else:
            continue
        entry = {**(defaults or {}), "model_path": str(p), "model_names": [name]}
        specs.append(spec_from_entry(entry, f"{root}/{p.name}"))
    return specs


def read_catalog(path: str | Path) -> list[ModelSpec]:
    """A catalog file: TOML with `[[model]]` tables (the keys of a stack file's `[[worker]]`)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CatalogError(f"catalog {path}: {e}") from e
    models = data.get("model", [])
    if isinstance(models, dict):
        models = [models]
    return [spec_from_entry(m, f"{path} [[model]] #{i + 1}") for i, m in enumerate(models)]


def dumps_specs(specs: list[ModelSpec]) -> str:
    return json.dumps([s.to_json() for s in specs])


def loads_specs(text: str) -> list[ModelSpec]:
    return [ModelSpec.from_json(d) for d in json.loads(text)]


def check_unique(specs: list[ModelSpec]) -> None:
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise CatalogError(f"two models are named {s.name!r}; set model_names on one of them")
        seen.add(s.name)
