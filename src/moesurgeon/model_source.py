"""Where a model comes from: `model.path` (and `model.tokenizer`) turned into a checked local directory.

Everything here runs on config.json and the file listing BEFORE any weight is read, so that a typo,
a pickle-only checkpoint, a dense model, a missing tokenizer or a broken config.json stops in
seconds with one message, instead of after minutes of loading.

A hub id is resolved to its local `huggingface_hub` cache snapshot (downloaded first when the hub
is reachable and `HF_HUB_OFFLINE` is not set), so that every later step — loading, the export's
source shards, sidecar files — reads one local directory.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from .arch import InvalidConfigError, UnsupportedModelError, get_adapter
from .io import CheckpointError
from .io.sidecar_files import read_json_object

log = logging.getLogger("moesurgeon")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a checkpoint needs for loading and export; weights and sidecars only (no other formats' weights)
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "tiktoken.model")


class ModelLoadError(ValueError):
    """The model spec does not point at a loadable, supported MoE checkpoint."""


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_local(path: str) -> bool:
    """A string meant as a file system path, even though nothing exists there."""
    if path.startswith(("/", "./", "../", "~", ".\\")) or "\\" in path or path.count("/") != 1:
        return True
    first = path.split("/")[0]
    return Path(first).exists() or Path(path).suffix in (".json", ".safetensors", ".bin")


def resolve_source(path: str, what: str = "model.path", cache_dir: str | None = None) -> Path:
    """A local directory for `path`: the path itself, or the hub cache snapshot of a hub id."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if _looks_local(path) or not _HUB_ID.match(path):
        raise ModelLoadError(
            f"{what}={path!r} does not exist locally (looked at {local.absolute()}); check the spelling, or pass a hub id "
            "of the form 'org/name'")
    from huggingface_hub import snapshot_download

    try:  # a model downloaded before, e.g. with `hf download`, needs no network
        return Path(snapshot_download(path, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # LocalEntryNotFoundError, or a cache without the `main` ref
        pass
    if hub_offline():
        raise ModelLoadError(
            f"{what}={path!r} is not a local directory and not in the hub cache, and HF_HUB_OFFLINE is set: "
            "download it where the hub is reachable (`hf download ORG/NAME`) or pass the local directory")
    log.info("%s=%s: downloading from the hub into the local cache", what, path)
    try:
        return Path(snapshot_download(path, allow_patterns=_DOWNLOAD_PATTERNS, cache_dir=cache_dir))
    except Exception as e:  # network, auth, missing repo: many exception types
        reason = " ".join(str(e).split())[:160]  # one line: hub errors span several
        raise ModelLoadError(
            f"{what}={path!r} is not a local directory (looked at {local.absolute()}) and could not be fetched "
            f"from the hub ({e.__class__.__name__}: {reason}). A typo in a path? Offline? Download it once "
            "(`hf download ORG/NAME`) and pass the local directory") from None


def read_config_json(model_dir: Path) -> dict:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"model.path={str(model_dir)!r} has no config.json: expected a Hugging Face model "
                             "directory (what save_pretrained writes)")
    try:
        return read_json_object(cfg_file, fix="restore it from the original checkpoint")
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None


def check_local_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """Validate a local model directory and return its config.json as a dict."""
    p = Path(path).expanduser()
    if not p.is_dir():
        hint = ""
        if "moesurgeon/assets" in str(p).replace("\\", "/"):
            hint = ("; the embedded model is rebuilt by `python -m moesurgeon experiment=build_reference "
                    "build_reference.install=true`")
        raise ModelLoadError(f"model.path={str(path)!r} is not a directory: expected a Hugging Face model directory "
                             f"with config.json and *.safetensors{hint}")
    config = read_config_json(p)
    if not any(p.glob("*.safetensors")):
        pickles = sorted(x.name for x in p.glob("*.bin"))
        if pickles and not allow_pickle:
            raise ModelLoadError(
                f"model.path={str(p)!r} holds only pickle weights ({', '.join(pickles[:3])}); moesurgeon reads and "
                "writes safetensors. Convert it once (load with transformers and save_pretrained), or pass "
                "model.allow_pickle=true to accept pickle files you trust (loaded with weights_only=True)")
        if not pickles:
            raise ModelLoadError(f"model.path={str(p)!r} has no *.safetensors weights: expected model.safetensors "
                                 "or shards with model.safetensors.index.json")
    try:
        adapter = get_adapter(config)
        for note in adapter.check_config(config):
            log.info("%s: %s", p, note)
    except (UnsupportedModelError, InvalidConfigError) as e:
        raise ModelLoadError(f"model.path={str(p)!r}: {e}") from None
    return config


def tokenizer_source(model_dir: Path, tokenizer: str | None) -> Path:
    """The directory to load the tokenizer from: `model.tokenizer` when given, else the model's own."""
    if tokenizer:
        return resolve_source(tokenizer, what="model.tokenizer")
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model.path={str(model_dir)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...): "
            "pass model.tokenizer=DIR_OR_HUB_ID with the tokenizer this model was trained with")
    return model_dir


def resolve_device(device: str) -> str:
    """'auto' -> the best available device; an explicit device that this torch cannot use -> a clear error."""
    if device in ("auto", "", "None", "null"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build that sees no GPU"
            raise ModelLoadError(f"model.device={device!r}, but this torch ({torch.__version__}) is {build}: pass "
                                 "model.device=auto (or cpu), or install a CUDA build of torch (README, Install)")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"model.device={device!r}, but only {torch.cuda.device_count()} CUDA device(s) "
                                 "are visible: choose cuda:0 .. cuda:N-1")
    elif device not in ("cpu", "mps") and not device.startswith(("xpu", "npu", "mps:")):
        raise ModelLoadError(f"model.device={device!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def check_token_ids(input_ids: torch.Tensor, vocab_rows: int, tokenizer_dir: Path, where: str) -> None:
    """Token ids the model's embedding cannot look up mean the tokenizer belongs to another model."""
    if input_ids.numel() == 0:
        return
    top = int(input_ids.max())
    if top >= vocab_rows:
        raise ModelLoadError(
            f"{where}: the tokenizer from {tokenizer_dir} produced token id {top}, but the model's embedding has "
            f"only {vocab_rows} rows: this tokenizer does not belong to the model. Pass model.tokenizer=DIR_OR_HUB_ID "
            "with the model's own tokenizer")
