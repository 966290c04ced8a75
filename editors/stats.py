"""Second moment of the edited layers' keys, C_ℓ = E[k kᵀ], cached by full provenance.

The key k of layer ℓ is the input of the MLP output projection that MEMIT-style editors rewrite
(`spec.mlp_out_name(ℓ)`; for GPT-2's Conv1D `c_proj` too, the (…, d_in) activation). Over N corpus
tokens, C_ℓ = (1/N) Σ_t k_t k_tᵀ (MEMIT, Meng et al. 2023, eq. 14: the λ·C term of the solve).

One pass over the corpus serves every requested layer: all output projections are traced at once
and the forward pass stops right after the deepest one ran, so the layers above it and the LM head
never run (the reference implementation made one full pass per layer). Sequences are right padded
and padding is excluded through the attention mask. Each batch's Gram matrix is formed in float32
(its rounding is far below the estimate's sampling error) and summed across batches in float64.

With no corpus (the first run), the model samples one (`Corpus.sampled`) and `KeyTap` collects the
edited layers' keys from the sampler's own KV-cache forward passes on the way, so no second pass
over the text runs: C is then over the sampled token ids as the model saw them (prompt and all but
each row's last sampled token), which a full forward over those ids reproduces to float rounding
(tested). Its cache key says `keys: "as-sampled"` instead of a `seq_len`. A layer asked for later
(another preset), when the sampled text is already cached, comes from one ordinary pass over that
text.

Cache: one safetensors file per (weights sha256, layer, module, corpus sha256, n_tokens, seq_len
or "as-sampled", dtype, forward precision) under `$KNOWLEDGER_CACHE/stats/`, named by a hash of that key, written
atomically (editors.fileio). The key and the sha256 of the tensor's bytes are stored in the file's
metadata and checked on load: a file whose key differs, whose data does not hash to its sha256 (a
flipped bit) or that cannot be read is recomputed with a logged note naming it, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .corpus import Corpus, has_bf16_units
from .fileio import atomic_write_bytes, sha256_bytes
from .hooks import TraceDict
from .model_spec import ModelSpec, spec_for
from .models import cache_root, weights_sha256
from .progress import Progress, report

log = logging.getLogger(__name__)

_KIND = "knowledger.mlp_out_key_second_moment"
_VERSION = 2  # 2: sha256 of the data in the metadata; bump when the computation changes what a cached file means
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def second_moments(model, tokenizer, layers: Iterable[int], corpus: Corpus | str | os.PathLike | None,
                   n_tokens: int, *, dtype: torch.dtype | str = torch.float32, batch_size: int = 16,
                   seq_len: int = 128, device: str | torch.device | None = None,
                   cache_dir: str | os.PathLike | None = None, weights_sha: str | None = None,
                   progress: Progress | bool | None = None, cache: bool = True,
                   autocast_bf16: bool | None = None) -> dict[int, torch.Tensor]:
    """C_ℓ (d_in, d_in) for each layer ℓ, symmetric, as `dtype`, on the CPU.

    corpus: a Corpus, a path to one, or None to let the model sample one (`Corpus.sampled`).
    device: where the forward passes run (default: the model's device; the model is not moved).
    cache: False neither reads nor writes the cache.
    progress: a Progress callback ("sample" while a corpus is sampled, then "stats", tokens done of
        tokens wanted); a bool is accepted for older callers and means no callback. Either way an
        INFO log line marks the start and the end of each phase.
    autocast_bf16: run the forward pass and the Gram products under bfloat16 autocast (CPU AMX:
        ~2.5x faster on the default model; keys move by ~1.5%, C by ~1% in Frobenius norm). Part of
        the cache key, so the two kinds of statistics never mix. None (default): where the
        hardware has bf16 matrix units (`corpus.has_bf16_units`).
    """
    if isinstance(progress, bool):
        progress = None
    device_ = torch.device(device) if device is not None else next(model.parameters()).device
    if autocast_bf16 is None:
        autocast_bf16 = has_bf16_units(device_)
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
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "stats"
    forward = "bfloat16-autocast" if autocast_bf16 else "model-dtype"

    def keys_for(corpus_sha: str, as_sampled: bool) -> dict[int, dict]:
        common = dict(kind=_KIND, version=_VERSION, weights_sha256=weights_sha, corpus_sha256=corpus_sha,
                      n_tokens=int(n_tokens), dtype=dtype_name, forward=forward)
        # as sampled: the keys the sampler's own forward passes saw (no seq_len: its rows are the
        # sequences); else: one pass over the corpus file cut into seq_len pieces
        shape = dict(keys="as-sampled") if as_sampled else dict(seq_len=int(seq_len))
        return {i: dict(common, **shape, layer=i, module=spec.mlp_out_name(i)) for i in layers}

    moments: dict[int, torch.Tensor] = {}
    if corpus is None:
        sample_kw = dict(weights_sha=weights_sha, autocast_bf16=autocast_bf16)
        corpus = Corpus.sampled_cached(model, n_tokens, **sample_kw)
        if corpus is None:  # sample it, collecting every layer's keys on the way
            tap = KeyTap(model, spec, layers, autocast_bf16)
            corpus = Corpus.sampled(model, tokenizer, n_tokens, progress=progress, observe=tap, **sample_kw)
            if tap.count:
                keys = keys_for(corpus.sha256, as_sampled=True)
                for i, c in tap.moments(dtype_name).items():
                    moments[i] = c
                    if cache:
                        _save(folder / _file_name(keys[i]), keys[i], c, tap.count)
                log.info("statistics: %s keys per layer collected while sampling", f"{tap.count:,}")
        elif cache:  # sampled earlier: its as-sampled statistics, if cached
            keys = keys_for(corpus.sha256, as_sampled=True)
            for i in layers:
                if (t := _load(folder / _file_name(keys[i]), keys[i])) is not None:
                    moments[i] = t
    elif not isinstance(corpus, Corpus):
        corpus = Corpus.from_path(corpus)

    keys = keys_for(corpus.sha256, as_sampled=False)
    if cache:
        for i in layers:
            if i not in moments and (t := _load(folder / _file_name(keys[i]), keys[i])) is not None:
                moments[i] = t
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
                n_tokens: int, seq_len: int, batch_size: int, device, progress: Progress | None,
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
    log.info("statistics: %s tokens through layers %s ...", f"{total:,}", layers)
    report(progress, "stats", 0, total)
    with torch.inference_mode(), autocast:
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
            report(progress, "stats", count, total)
    seconds = time.perf_counter() - start
    log.info("statistics: %s tokens through layers %s ... done in %.1f s (%.0f tokens/s)",
             f"{count:,}", layers, seconds, count / max(seconds, 1e-9))
    return {i: s.cpu() for i, s in sums.items()}, count


class KeyTap:
    """Σ_t k_t k_tᵀ of the traced layers over the real positions of every forward pass it wraps:
    an `observe` for `Corpus.sampled`, so the sampler's own KV-cache forward passes give the keys
    (the same keys as a full forward over the sampled token ids, up to float rounding; tested).

        tap = KeyTap(model, spec, layers, autocast_bf16)
        with tap(real):  # real: (b, t) bool, the input's non-padding positions
            model(...)
        tap.moments("float32")  # {layer: C (d_in, d_in)}, tap.count keys each

    Keys are buffered and folded into the float64 sums `flush_rows` at a time (one larger Gram
    product instead of one per decoding step).
    """

    flush_rows = 2048

    def __init__(self, model, spec: ModelSpec, layers: Iterable[int], autocast_bf16: bool = False):
        self.model, self.autocast_bf16 = model, autocast_bf16
        self.names = {i: spec.mlp_out_name(i) for i in layers}
        self.d_in = {i: spec.mlp_dims(model, i)[1] for i in self.names}
        self.sums = {i: torch.zeros(d, d, dtype=torch.float64) for i, d in self.d_in.items()}
        self._buf: dict[int, list[torch.Tensor]] = {i: [] for i in self.names}
        self._buffered = 0
        self.count = 0

    @contextmanager
    def __call__(self, real: torch.Tensor):
        with TraceDict(self.model, self.names.values(), retain_input=True, retain_output=False) as td:
            yield td
        for i, name in self.names.items():
            k = td[name].input  # (b, t, d_in)
            K = k[real]  # (n, d_in)
            self._buf[i].append(K if self.autocast_bf16 else K.float())
        n = int(real.sum())
        self.count += n
        self._buffered += n
        if self._buffered >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        for i, parts in self._buf.items():
            if parts:
                K = torch.cat(parts)  # (n, d_in)
                self.sums[i] += (K.T @ K).cpu()  # (d_in, d_in), summed in float64
                parts.clear()
        self._buffered = 0

    def moments(self, dtype: str = "float32") -> dict[int, torch.Tensor]:
        """C_ℓ = Σ k kᵀ / count, exactly symmetric, as `dtype`, on the CPU."""
        self._flush()
        if not self.count:
            raise ValueError("no keys were collected")
        out = {}
        for i, s in self.sums.items():
            c = (s / self.count).to(_DTYPES[_dtype_name(dtype)])  # (d_in, d_in)
            out[i] = (c + c.T) / 2
        return out


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


def _tensor_sha(t: torch.Tensor) -> str:
    return sha256_bytes(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def _read_cached(path: Path, key: dict, what: str) -> tuple[torch.Tensor, dict] | None:
    """(tensor, metadata) from a cache file whose key matches and whose tensor bytes hash to the
    sha256 stored beside them; None (with a logged note naming the file) for anything else."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("key", "null")) != key:
                log.warning("%s cache %s holds a different key: recomputing", what, path)
                return None
            tensor = f.get_tensor("mom2")
    except Exception as e:  # a truncated or foreign file is recomputed, not trusted
        log.warning("%s cache %s is unreadable (%s): recomputing", what, path, e)
        return None
    if meta.get("sha256") != _tensor_sha(tensor):
        log.warning("%s cache %s is corrupt (its data does not match its sha256): recomputing",
                    what, path)
        return None
    return tensor, meta


def _write_cached(path: Path, key: dict, tensor: torch.Tensor, **extra: str) -> None:
    tensor = tensor.detach().contiguous().cpu()
    meta = {"key": _key_json(key), "sha256": _tensor_sha(tensor), **extra}
    atomic_write_bytes(path, safetensors_bytes({"mom2": tensor}, metadata=meta))


def _load(path: Path, key: dict) -> torch.Tensor | None:
    got = _read_cached(path, key, "statistics")
    return None if got is None else got[0]


def _save(path: Path, key: dict, tensor: torch.Tensor, count: int) -> None:
    _write_cached(path, key, tensor, count=str(count))


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
    if cache:
        got = _read_cached(path, key, "null-space")
        if got is not None:
            return got[0], json.loads(got[1]["info"])
    basis, info = null_space_basis(Cc, threshold, scale=scale)
    if cache:
        _write_cached(path, key, basis, info=json.dumps(info))
    return basis, info
