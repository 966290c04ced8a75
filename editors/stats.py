"""Second moment of the edited layers' keys, C_ℓ = E[k kᵀ], cached by full provenance.

The key k of layer ℓ is the input of the MLP output projection that MEMIT-style editors rewrite
(`spec.mlp_out_name(ℓ)`; for GPT-2's Conv1D `c_proj` too, the (…, d_in) activation). Over N corpus
tokens, C_ℓ = (1/N) Σ_t k_t k_tᵀ (MEMIT, Meng et al. 2023, eq. 14: the λ·C term of the solve).

One pass over the corpus serves every requested layer: all output projections are traced at once
and the forward pass stops right after the deepest one ran, so the layers above it and the LM head
never run (the reference implementation made one full pass per layer). Sequences are right padded
and padding is excluded through the attention mask. Each batch's Gram matrix is formed in float32
(its rounding is far below the estimate's sampling error) and summed across batches in float64.

Cache: one safetensors file per (weights sha256, layer, module, corpus sha256, n_tokens, seq_len,
dtype, forward precision) under `$KNOWLEDGER_CACHE/stats/`, named by a hash of that key; the key
is stored in the file's metadata and compared on load, so a file that does not match is
recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .corpus import Corpus
from .hooks import TraceDict
from .model_spec import ModelSpec, spec_for
from .models import cache_root, weights_sha256

log = logging.getLogger(__name__)

_KIND = "knowledger.mlp_out_key_second_moment"
_VERSION = 1  # bump when the computation changes what a cached file means
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def second_moments(model, tokenizer, layers: Iterable[int], corpus: Corpus | str | os.PathLike | None,
                   n_tokens: int, *, dtype: torch.dtype | str = torch.float32, batch_size: int = 16,
                   seq_len: int = 128, device: str | torch.device | None = None,
                   cache_dir: str | os.PathLike | None = None, weights_sha: str | None = None,
                   progress: bool = True, cache: bool = True,
                   autocast_bf16: bool = False) -> dict[int, torch.Tensor]:
    """C_ℓ (d_in, d_in) for each layer ℓ, symmetric, as `dtype`, on the CPU.

    corpus: a Corpus, a path to one, or None to let the model sample one (`Corpus.sampled`).
    device: where the forward passes run (default: the model's device; the model is not moved).
    cache: False neither reads nor writes the cache.
    autocast_bf16: run the forward pass and the Gram products under bfloat16 autocast (CPU AMX:
        ~2.5x faster on the default model; keys move by ~1.5%, C by ~1% in Frobenius norm). Part of
        the cache key, so the two kinds of statistics never mix.
    """
    layers = sorted({int(i) for i in layers})
    if not layers:
        raise ValueError("second_moments needs at least one layer")
    dtype_name = _dtype_name(dtype)
    spec = spec_for(model)
    n = spec.n_layers(model)
    if layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"layers {layers} out of range for a model with {n} layers")
    if corpus is None or cache:
        weights_sha = weights_sha or weights_sha256(model)
    if corpus is None:
        corpus = Corpus.sampled(model, tokenizer, n_tokens, weights_sha=weights_sha, progress=progress)
    elif not isinstance(corpus, Corpus):
        corpus = Corpus.from_path(corpus)

    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "stats"
    keys = {i: dict(kind=_KIND, version=_VERSION, weights_sha256=weights_sha, layer=i,
                    module=spec.mlp_out_name(i), corpus_sha256=corpus.sha256, n_tokens=int(n_tokens),
                    seq_len=int(seq_len), dtype=dtype_name,
                    forward="bfloat16-autocast" if autocast_bf16 else "model-dtype") for i in layers}
    found = {i: _load(folder / _file_name(keys[i]), keys[i]) for i in layers} if cache else {}
    moments = {i: t for i, t in found.items() if t is not None}
    missing = [i for i in layers if i not in moments]
    if missing:
        sums, count = _accumulate(model, tokenizer, spec, missing, corpus, n_tokens, seq_len,
                                  batch_size, device, progress, autocast_bf16)
        for i in missing:
            c = (sums[i] / count).to(_DTYPES[dtype_name])  # (d_in, d_in)
            moments[i] = (c + c.T) / 2  # exactly symmetric
            if cache:
                _save(folder / _file_name(keys[i]), keys[i], moments[i], count)
    return {i: moments[i] for i in layers}


def _accumulate(model, tokenizer, spec: ModelSpec, layers: list[int], corpus: Corpus,
                n_tokens: int, seq_len: int, batch_size: int, device, progress: bool,
                autocast_bf16: bool):
    """Σ_t k_t k_tᵀ per layer (float64) and the token count, from one pass over the corpus."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    chunks = corpus.chunks(tokenizer, n_tokens, seq_len)
    if not chunks:
        raise ValueError(f"corpus {corpus.path} yields no token sequences")
    chunks.sort(key=len, reverse=True)  # similar lengths share a batch: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    names = {i: spec.mlp_out_name(i) for i in layers}
    d_in = {i: spec.mlp_dims(model, i)[1] for i in layers}
    sums = {i: torch.zeros(d_in[i], d_in[i], dtype=torch.float64, device=device) for i in layers}
    count = 0
    total = sum(map(len, chunks))
    start = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16)
    bar = tqdm(total=total, unit="tok", desc=f"key statistics, layers {layers}", disable=not progress)
    with torch.inference_mode(), autocast, bar:
        for b in range(0, len(chunks), batch_size):
            batch = chunks[b:b + batch_size]
            width = len(batch[0])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (b, t), right padded
            mask = torch.zeros((len(batch), width), dtype=torch.long)  # (b, t)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            with TraceDict(model, names.values(), retain_input=True, retain_output=False,
                           stop=True) as td:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool()  # (b, t)
            dense = bool(real.all())
            for i, name in names.items():
                k = td[name].input  # (b, t, d_in)
                K = k.reshape(-1, d_in[i]) if dense else k[real]  # (n, d_in)
                if not autocast_bf16:
                    K = K.float()
                sums[i] += K.T @ K  # (d_in, d_in), summed in float64
            n = int(real.sum())
            count += n
            bar.update(n)
    seconds = time.perf_counter() - start
    log.info("key statistics for layers %s: %d tokens in %.1f s (%.0f tokens/s)", layers, count,
             seconds, count / max(seconds, 1e-9))
    return {i: s.cpu() for i, s in sums.items()}, count


# --- the cache -----------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"statistics dtype must be float32 or float64, got {dtype!r}")
    return name


def _key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _file_name(key: dict) -> str:
    return hashlib.sha256(_key_json(key).encode()).hexdigest()[:32] + ".safetensors"


def _load(path: Path, key: dict) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("key", "null")) != key:
                log.warning("statistics cache %s holds a different key: recomputing", path.name)
                return None
            return f.get_tensor("mom2")
    except Exception as e:  # a truncated or foreign file is recomputed, not trusted
        log.warning("statistics cache %s is unreadable (%s): recomputing", path.name, e)
        return None


def _save(path: Path, key: dict, tensor: torch.Tensor, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({"mom2": tensor.contiguous()}, tmp,
                  metadata={"key": _key_json(key), "count": str(count)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_NULL_KIND = "knowledger.null_space_basis"


def null_space(C: torch.Tensor, threshold: float, scale: str = "energy", *,
               cache_dir: str | os.PathLike | None = None, cache: bool = True) -> tuple[torch.Tensor, dict]:
    """AlphaEdit's null-space basis Û of C (editors.solvers.null_space_basis), cached beside the
    statistics: it depends only on C (hence on the base weights and the corpus) and the threshold.

    Keyed by the sha256 of C's bytes, the threshold and the scale; an eigendecomposition of a
    1536×1536 C takes about a second here, per layer, so each process would otherwise redo it.
    """
    from .solvers import null_space_basis

    Cc = C.detach().contiguous().cpu()
    sha = hashlib.sha256(Cc.numpy().tobytes()).hexdigest()
    key = dict(kind=_NULL_KIND, version=1, c_sha256=sha, c_dtype=str(Cc.dtype),
               threshold=float(threshold), scale=scale)
    path = (Path(cache_dir) if cache_dir is not None else cache_root() / "stats") / _file_name(key)
    if cache and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if json.loads(meta.get("key", "null")) == key:
                    return f.get_tensor("mom2"), json.loads(meta["info"])
        except Exception as e:  # unreadable: recompute
            log.warning("null-space cache %s is unreadable (%s): recomputing", path.name, e)
    basis, info = null_space_basis(Cc, threshold, scale=scale)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file({"mom2": basis.contiguous()}, tmp,
                      metadata={"key": _key_json(key), "info": json.dumps(info)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return basis, info
