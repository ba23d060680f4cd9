"""Models by name: `ORG/NAME[:QUANT]` from the Hugging Face hub (or a mirror, or ModelScope) into
the standard cache, before an engine loads it.

- What to fetch is planned from the repository's file list (`plan`): an HF folder (config.json
  and safetensors or PyTorch weights: the folder, without other formats' weights) or one
  quantization of a GGUF repository (`:QUANT`, its split parts included; with none, Q4_K_M,
  else the smallest), with the vision projector beside it when the repository has one
  (`mmproj*.gguf` in the model's folder, F16 preferred: the llama.cpp engine finds it next to
  the model). A repository with neither says what it holds.
- `huggingface_hub` does the download, so HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and HF_HOME mean
  what they mean to every other tool, the cache is shared with them, and an interrupted
  download resumes from its `.incomplete` blob (a file appears in a snapshot only once whole:
  nothing half-written is ever taken for a model).
- Free disk space is checked against what is left to fetch before anything is fetched.
- Progress is measured from the cache's files (done and `.incomplete` bytes against the plan's
  total) by a thread, and handed to a callback: the worker logs percentage lines and reports
  it in its status, `llmrelay pull` draws a bar on a terminal.
- Without the network (HF_HUB_OFFLINE, or the hub unreachable) a name resolves from the cache
  alone when everything the plan needs is there; otherwise the error lists what is cached.
- `LLMRELAY_USE_MODELSCOPE=1` (or FastChat's `FASTCHAT_USE_MODELSCOPE=True`) fetches from
  ModelScope with the optional `modelscope` package instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("llmrelay.worker")

# ORG/NAME[:QUANT], optionally written as Ollama's hf.co/ORG/NAME.
_REF = re.compile(r"^(?:(?:hf\.co|huggingface\.co)/)?([A-Za-z0-9][\w.-]*)/([\w.-]+?)(?::([\w.-]+))?$")
_QUANT = re.compile(r"^(?:I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|F16|FP16|F32|FP32|MXFP4(?:_MOE)?)$",
                    re.IGNORECASE)
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})$")
DEFAULT_QUANT = "Q4_K_M"
HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
# Weights in formats no engine here loads, skipped when fetching an HF folder.
OTHER_FORMATS = ["*.gguf", "*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot",
                 "tf_model*", "flax_model*", "coreml/*", "*.mlmodel", "*.tflite", "*.pte"]
TORCH_WEIGHTS = ["*.bin", "*.pt", "*.pth"]


class HubError(Exception):
    """A name that cannot be fetched or loaded; the message says what to do."""


@dataclass(frozen=True)
class HubRef:
    repo: str  # ORG/NAME
    quant: str | None = None  # as typed, e.g. Q4_K_M

    @property
    def name(self) -> str:
        """The default public name: the repository's name (FastChat names a model after the
        last part of its path), with the quantization when one was asked for."""
        base = self.repo.split("/")[-1]
        return f"{base}:{self.quant}" if self.quant else base

    def __str__(self) -> str:
        return self.repo + (f":{self.quant}" if self.quant else "")


def parse_ref(text: str) -> HubRef | None:
    """`ORG/NAME[:QUANT]` as a hub reference; None for anything that is not shaped like one."""
    text = text.strip()
    if text.startswith((".", "/", "~")) or text.count("/") > 3:
        return None
    m = _REF.match(text)
    if m is None or m.group(2) in (".", ".."):
        return None
    return HubRef(f"{m.group(1)}/{m.group(2)}", m.group(3) or None)


def use_modelscope() -> bool:
    return (os.environ.get("LLMRELAY_USE_MODELSCOPE", "").strip().lower() in ("1", "true", "yes")
            or os.environ.get("FASTCHAT_USE_MODELSCOPE", "").strip().lower() == "true")


# ---- what to fetch --------------------------------------------------------------------------


def quant_of(path: str) -> str | None:
    """The quantization a GGUF file's name (or folder) says, upper-cased; None if none does."""
    parts = path.split("/")
    stem = _SPLIT.sub("", parts[-1][:-5] if parts[-1].lower().endswith(".gguf") else parts[-1])
    for token in reversed(re.split(r"[-.]", stem)):
        if _QUANT.match(token):
            return token.upper()
    for folder in reversed(parts[:-1]):
        if _QUANT.match(folder):
            return folder.upper()
    return None


@dataclass
class Plan:
    repo: str
    kind: str  # "gguf" or "hf"
    files: dict[str, int]  # path in the repository -> size (bytes)
    main: str = ""  # the file to load: a GGUF file (the first part of a split one); "" for hf
    quant: str | None = None
    patterns: list[str] = field(default_factory=list)  # what snapshot_download is asked for

    @property
    def total(self) -> int:
        return sum(self.files.values())


def _fmt(files: dict[str, int]) -> str:
    from llmrelay.ondemand.sizes import fmt_bytes

    return fmt_bytes(sum(files.values()))


def plan(ref: HubRef, files: dict[str, int], where: str = "the hub") -> Plan:
    """What to fetch of `ref` given the repository's files (path -> size); HubError when the
    repository holds nothing loadable or `:QUANT` names nothing there."""
    ggufs = {p: s for p, s in files.items() if p.lower().endswith(".gguf")
             and not _is_projector(p)}
    hf_ok = "config.json" in files and any(
        any(Path(p).match(pat) for pat in HF_WEIGHTS) for p in files if "/" not in p)
    if hf_ok and not (ref.quant and ggufs):
        if ref.quant:
            raise HubError(f"{ref.repo} is an HF model folder, not a GGUF repository: it has no "
                           f":{ref.quant} to pick (drop ':{ref.quant}')")
        skip = OTHER_FORMATS + (TORCH_WEIGHTS if any(p.endswith(".safetensors") for p in files)
                                else [])
        chosen = {p: s for p, s in files.items()
                  if not any(Path(p).match(pat) or p.startswith(pat.rstrip("*")) and
                             pat.endswith("/*") for pat in skip)
                  and not p.startswith(".git")}
        return Plan(ref.repo, "hf", chosen, patterns=sorted(chosen))
    if not ggufs:
        shown = ", ".join(sorted(files)[:15]) + (" ..." if len(files) > 15 else "")
        raise HubError(f"{ref.repo} on {where} holds no weights llmrelay can load (a GGUF file, or "
                       f"config.json with safetensors or PyTorch weights); it holds: "
                       f"{shown or 'no files'}")
    groups: dict[str, dict[str, int]] = {}
    for p, s in ggufs.items():
        groups.setdefault(quant_of(p) or p, {})[p] = s
    names = sorted(groups, key=lambda q: sum(groups[q].values()))
    listing = ", ".join(f"{q} ({_fmt(groups[q])})" for q in names)
    if ref.quant:
        want = ref.quant.upper()
        if want not in groups:
            raise HubError(f"{ref.repo} has no {ref.quant} quantization; it has: {listing}")
        key = want
    elif DEFAULT_QUANT in groups:
        key = DEFAULT_QUANT
    elif len(groups) == 1:
        key = names[0]
    elif all(quant_of(p) for p in ggufs):
        key = names[0]  # the smallest
    else:
        raise HubError(f"{ref.repo} holds several GGUF models and none is {DEFAULT_QUANT}; pick one "
                       f"with {ref.repo}:QUANT or a file's name. It has: {listing}")
    chosen = groups[key]
    stems = {_SPLIT.sub("", p[:-5]) for p in chosen}
    if len(stems) > 1:
        raise HubError(f"{ref.repo} has several {key} files ({', '.join(sorted(chosen))}); "
                       "give the model's file itself (download it, then --model-path FILE)")
    parts = sorted(chosen)
    m = _SPLIT.search(parts[0][:-5])
    if m and len(parts) != int(m.group(2)):
        raise HubError(f"{ref.repo}: the split GGUF {parts[0]} has {len(parts)} of its "
                       f"{int(m.group(2))} parts in the repository")
    quant = key if quant_of(parts[0]) else None
    projector = _projector(files, parts[0], key)
    if projector is not None:
        chosen = {**chosen, projector: files[projector]}
    return Plan(ref.repo, "gguf", chosen, main=parts[0], quant=quant,
                patterns=parts + ([projector] if projector else []))


def _is_projector(path: str) -> bool:
    """A vision model's projector GGUF (`mmproj*.gguf`), not a model to load."""
    name = path.split("/")[-1].lower()
    return name.startswith("mmproj") and name.endswith(".gguf")


# A vision projector's precision, most wanted first (a projector is small; F16 is the usual).
PROJECTOR_QUANTS = ("F16", "BF16", "F32", "Q8_0")


def _projector(files: dict[str, int], main: str, quant: str) -> str | None:
    """The vision projector to fetch with the GGUF `main` (quantization `quant`): an
    `mmproj*.gguf` file in its folder; F16 first, then BF16, F32, Q8_0, the model's own
    quantization, else the first by name. None when there is none."""
    folder = main.rsplit("/", 1)[0] if "/" in main else ""
    found = sorted(p for p in files
                   if _is_projector(p) and (p.rsplit("/", 1)[0] if "/" in p else "") == folder)
    if not found:
        return None
    for want in (*PROJECTOR_QUANTS, quant.upper()):
        for p in found:
            if quant_of(p) == want:
                return p
    return found[0]


# ---- the cache --------------------------------------------------------------------------------


def cache_dir() -> Path:
    if use_modelscope():
        return Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope" / "hub"))
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _repo_cache(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def cached_snapshot(repo: str, revision: str | None) -> tuple[Path, dict[str, int]] | None:
    """(snapshot folder, its files with sizes) of `repo` at `revision` in the HF cache: the
    repository's file list as last seen online (the cached tree) where there is one, else the
    whole files in the snapshot. None when nothing of that revision is cached."""
    root = _repo_cache(repo)
    rev = revision or "main"
    commit = rev
    ref_file = root / "refs" / rev
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    snap = root / "snapshots" / commit
    if not snap.is_dir():
        return None
    tree = root / "trees" / f"{commit}.json"
    try:
        data = json.loads(tree.read_text())
        return snap, {p: int(v.get("size") or 0) for p, v in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    files = {}
    for p in snap.rglob("*"):
        if p.is_file():  # follows the link: a blob that is whole
            files[p.relative_to(snap).as_posix()] = p.stat().st_size
    return snap, files


def complete(snap: Path, p: Plan) -> bool:
    """Every file of the plan is in the snapshot, whole."""
    for name, size in p.files.items():
        f = snap / name
        if not f.is_file() or (size and f.stat().st_size != size):
            return False
    return True


def from_cache(ref: HubRef, revision: str | None = None) -> tuple[Path, Plan] | None:
    """(snapshot, plan) when everything `ref` needs is whole in the cache; no network."""
    if use_modelscope():
        return None
    found = cached_snapshot(ref.repo, revision)
    if found is None:
        return None
    try:
        p = plan(ref, found[1], "the cache")
    except HubError:
        return None
    return (found[0], p) if complete(found[0], p) else None


@dataclass
class CachedRepo:
    repo: str
    revisions: list[str]  # refs (main, ...) and commits
    size: int
    files: list[str]  # GGUF files, or the HF folder's weights


def list_cache() -> list[CachedRepo]:
    """The models in the HF cache (whole files only; `.incomplete` blobs are not counted)."""
    root = cache_dir()
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.glob("models--*")):
        repo = d.name[len("models--"):].replace("--", "/", 1)
        refs = sorted(p.name for p in (d / "refs").glob("*")) if (d / "refs").is_dir() else []
        blobs = [b for b in (d / "blobs").glob("*") if not b.name.endswith(".incomplete")] \
            if (d / "blobs").is_dir() else []
        names: set[str] = set()
        for snap in (d / "snapshots").glob("*") if (d / "snapshots").is_dir() else []:
            for f in snap.rglob("*"):
                if f.is_file() and (f.suffix == ".gguf" or f.suffix == ".safetensors"
                                    or f.name == "config.json"):
                    names.add(f.relative_to(snap).as_posix())
        out.append(CachedRepo(repo, refs, sum(b.stat().st_size for b in blobs), sorted(names)))
    return out


def _describe_cache(repo: str) -> str:
    found = list_cache()
    mine = [c for c in found if c.repo == repo]
    where = f"the cache ({cache_dir()})"
    if mine:
        return f"{where} holds {repo} only in part ({', '.join(mine[0].files) or 'no weights'})"
    others = ", ".join(c.repo for c in found[:10]) or "nothing"
    return f"{where} does not hold {repo} (it holds: {others})"


# ---- progress ---------------------------------------------------------------------------------


@dataclass
class Progress:
    repo: str
    done: int
    total: int
    finished: bool = False

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def to_json(self) -> dict[str, Any]:
        return {"repo": self.repo, "done_bytes": self.done, "total_bytes": self.total,
                "percent": round(self.percent, 1)}


def _measure(p: Plan, snap_root: Path) -> int:
    """Bytes of the plan on disk: whole files in any snapshot, plus `.incomplete` blobs."""
    done = 0
    for snap in snap_root.glob("snapshots/*"):
        for name, size in p.files.items():
            f = snap / name
            if f.is_file():
                done += size
        if done:
            break
    done += sum(b.stat().st_size for b in snap_root.glob("blobs/*.incomplete") if b.is_file())
    return min(done, p.total)


class Watcher:
    """A thread that measures a download's progress every `interval` seconds."""

    def __init__(self, p: Plan, root: Path, report: Callable[[Progress], None],
                 interval: float = 0.5) -> None:
        self.plan = p
        self.root = root
        self.report = report
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="download-progress")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.report(Progress(self.plan.repo, _measure(self.plan, self.root), self.plan.total))
            except OSError:
                pass

    def __enter__(self) -> Watcher:
        self.report(Progress(self.plan.repo, _measure(self.plan, self.root), self.plan.total))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class LogProgress:
    """Percentage lines for a log: one every `step` percent or `every` seconds, whichever first."""

    def __init__(self, what: str, step: float = 10.0, every: float = 10.0) -> None:
        self.what = what
        self.step = step
        self.every = every
        self.last_pct = -1e9
        self.last_t = 0.0

    def __call__(self, p: Progress) -> None:
        from llmrelay.ondemand.sizes import fmt_bytes

        now = time.monotonic()
        if p.finished or p.percent - self.last_pct >= self.step or now - self.last_t >= self.every:
            self.last_pct, self.last_t = p.percent, now
            log.info("downloading %s: %.0f%% (%s of %s)", self.what, p.percent, fmt_bytes(p.done),
                     fmt_bytes(p.total))


# ---- fetching ---------------------------------------------------------------------------------


def where() -> str:
    """The hub asked: HF_ENDPOINT's value (or ModelScope's)."""
    return _endpoint()


def _endpoint() -> str:
    if use_modelscope():
        return os.environ.get("MODELSCOPE_DOMAIN", "https://modelscope.cn")
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in (
        "1", "true", "yes", "on")


def _explain(e: Exception, ref: HubRef, revision: str | None) -> HubError:
    """huggingface_hub's exception as what to do."""
    from huggingface_hub import errors

    endpoint = _endpoint()
    if isinstance(e, errors.GatedRepoError):
        return HubError(f"{ref.repo} is gated: accept its licence on {endpoint}/{ref.repo} with your "
                        "account, then set HF_TOKEN to a token of that account")
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(f"{ref.repo} has no revision {revision!r} on {endpoint} (a branch, tag or "
                        "commit hash)")
    if isinstance(e, errors.RepositoryNotFoundError):
        token = "" if os.environ.get("HF_TOKEN") else " If it is private or gated, set HF_TOKEN."
        return HubError(f"{ref.repo} is not a model repository on {endpoint} (HTTP "
                        f"{_status(e) or 404}): check the spelling of ORG/NAME.{token} A local "
                        "path must exist.")
    status = _status(e)
    if status in (401, 403):
        return HubError(f"{endpoint} refused {ref.repo} (HTTP {status}): set HF_TOKEN to a token "
                        f"that may read it, and accept the model's licence on {endpoint}/{ref.repo}")
    return HubError(f"fetching {ref.repo} from {endpoint} failed: {type(e).__name__}: {e}")


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _network_error(e: BaseException) -> bool:
    """A failure to reach the hub (not an answer from it). huggingface_hub's HTTP client may
    be httpx or its fork httpx2: both are told by their class names."""
    from huggingface_hub import errors

    if isinstance(e, errors.HfHubHTTPError):
        return False
    if isinstance(e, (errors.LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "NetworkError", "TimeoutException", "ConnectionError"})


def _reachable() -> BaseException | None:
    """None when the hub's endpoint answers at all; else why not (at once, where
    huggingface_hub would retry for half a minute)."""
    import httpx

    try:
        httpx.head(_endpoint(), timeout=httpx.Timeout(10.0, connect=5.0))
    except httpx.TransportError as e:
        return e
    return None


def remote_files(ref: HubRef, revision: str | None) -> dict[str, int]:
    """The repository's files and sizes, from the hub (exceptions as huggingface_hub raises them)."""
    if use_modelscope():
        return _modelscope_files(ref, revision)
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    return {f.path: int(f.size or 0) for f in api.list_repo_tree(
        ref.repo, revision=revision or "main", recursive=True) if isinstance(f, RepoFile)}


def check_disk(p: Plan, root: Path) -> None:
    """HubError when what is left to fetch does not fit on the cache's disk."""
    from llmrelay.ondemand.sizes import fmt_bytes

    left = p.total - (_measure(p, root) if root.exists() else 0)
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if left > free:
        raise HubError(f"{p.repo} needs {fmt_bytes(left)} more on disk ({len(p.files)} files, "
                       f"{fmt_bytes(p.total)} in all) but {probe} has {fmt_bytes(free)} free: free "
                       "some space, or set HF_HOME (or HF_HUB_CACHE) to a disk with room")


def fetch(ref: HubRef, revision: str | None = None,
          progress: Callable[[Progress], None] | None = None) -> tuple[Path, Plan]:
    """Make `ref` whole in the cache (fetching what is missing); (snapshot folder, plan)."""
    offline = _offline()
    why = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            down = _reachable()
            if down is not None:
                raise down
            files = remote_files(ref, revision)
        except HubError:
            raise
        except Exception as e:  # noqa: BLE001 - sorted below: network, 404, 401, ...
            if not _network_error(e):
                raise _explain(e, ref, revision) from None
            log.warning("%s is not reachable (%s); looking in the cache", _endpoint(),
                        type(e).__name__)
            offline = True
            why = f"{_endpoint()} is not reachable ({type(e).__name__})"
    if offline:
        cached = from_cache(ref, revision)
        if cached is not None:
            return cached
        raise HubError(f"{ref} cannot be fetched: {why}, and {_describe_cache(ref.repo)}. Set "
                       "HF_ENDPOINT to a mirror that is reachable, or fill the cache while online "
                       f"with `llmrelay pull {ref}`")
    p = plan(ref, files, _endpoint())
    root = _repo_cache(ref.repo)
    found = cached_snapshot(ref.repo, revision)
    if found is not None and complete(found[0], p):
        return found[0], p
    check_disk(p, root)
    report = progress or (lambda _p: None)
    with Watcher(p, root, report):
        try:
            snap = Path(_download(ref, revision, p))
        except HubError:
            raise
        except Exception as e:  # noqa: BLE001
            if _network_error(e):
                raise HubError(f"the download of {ref} from {_endpoint()} broke off "
                               f"({type(e).__name__}: {e}); start again to resume it") from None
            raise _explain(e, ref, revision) from None
    if not complete(snap, p):
        raise HubError(f"the download of {ref} ended without every file; start again to resume it")
    report(Progress(p.repo, p.total, p.total, finished=True))
    return snap, p


def _download(ref: HubRef, revision: str | None, p: Plan) -> str:
    if use_modelscope():
        return _modelscope_download(ref, revision, p)
    from huggingface_hub import snapshot_download

    for name, size in sorted(p.files.items(), key=lambda kv: -kv[1]):
        if size >= RESUMABLE_MIN:
            _resumable(ref, revision, name)
    # the rest, and the snapshot's links to the blobs fetched above
    return snapshot_download(ref.repo, revision=revision or "main", allow_patterns=p.patterns)


RESUMABLE_MIN = 8 * 1024 * 1024  # files this large are fetched by `_resumable`
CHUNK = 1 << 20


def _resumable(ref: HubRef, revision: str | None, name: str) -> None:
    """Fetch one file served over plain HTTP into its blob, resuming from
    `blobs/<etag>.incomplete`: huggingface_hub (2.x) starts every process's download of a file
    over in a temporary file of its own, so a worker stopped half-way through a large model
    would fetch it all again. A file stored with Xet is left to huggingface_hub (hf_xet keeps
    its own chunk cache)."""
    import httpx
    from filelock import FileLock
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    meta = get_hf_file_metadata(hf_hub_url(ref.repo, name, revision=revision or "main"))
    if meta.xet_file_data is not None or not meta.etag or not meta.size:
        return
    root = _repo_cache(ref.repo)
    blob = root / "blobs" / meta.etag
    if blob.exists():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    part = blob.with_name(blob.name + ".incomplete")
    with FileLock(str(root / ".locks" / f"llmrelay-{meta.etag}.lock")):
        if blob.exists():
            return
        have = part.stat().st_size if part.exists() else 0
        if have > meta.size:
            have = 0
        headers = build_hf_headers()
        if have:
            headers["Range"] = f"bytes={have}-"
            log.info("resuming %s of %s at %d of %d bytes", name, ref.repo, have, meta.size)
        with httpx.stream("GET", meta.location, headers=headers, follow_redirects=True,
                          timeout=httpx.Timeout(60.0, connect=10.0)) as r:
            if r.status_code == 416 and have == meta.size:
                pass
            else:
                r.raise_for_status()
                mode = "ab" if have and r.status_code == 206 else "wb"  # 200: range ignored
                with open(part, mode) as f:
                    for chunk in r.iter_bytes(CHUNK):
                        f.write(chunk)
        if part.stat().st_size != meta.size:
            raise HubError(f"{name} of {ref.repo} arrived with {part.stat().st_size} of its "
                           f"{meta.size} bytes; start again to resume it")
        os.replace(part, blob)


# ---- ModelScope (optional extra; not tested here: no ModelScope server runs offline) ------------


def _modelscope() -> Any:
    try:
        import modelscope  # type: ignore[import-not-found]
    except ImportError:
        raise HubError("LLMRELAY_USE_MODELSCOPE (or FASTCHAT_USE_MODELSCOPE) is set but the "
                       "modelscope package is not installed: pip install 'llmrelay[modelscope]'"
                       ) from None
    return modelscope


def _modelscope_files(ref: HubRef, revision: str | None) -> dict[str, int]:
    ms = _modelscope()
    from modelscope.hub.api import HubApi  # type: ignore[import-not-found]

    del ms
    entries = HubApi().get_model_files(ref.repo, revision=revision or "master", recursive=True)
    return {e["Path"]: int(e.get("Size") or 0) for e in entries if e.get("Type") != "tree"}


def _modelscope_download(ref: HubRef, revision: str | None, p: Plan) -> str:
    _modelscope()
    from modelscope import snapshot_download  # type: ignore[import-not-found]

    return str(snapshot_download(ref.repo, revision=revision or "master",
                                 allow_patterns=p.patterns))
