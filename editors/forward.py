"""Partial forward passes: run only the decoder blocks an edit needs.

The v* optimisation changes the residual stream at one layer; the blocks below it do not depend on
the optimised vector, so their output is computed once and cached, and each optimisation step runs
only the blocks above (`run_from`). Truncation swaps the block list for its tail inside a context
manager and restores it on exit, so it works for every family in the architecture table without
re-implementing their attention masks or rotary embeddings.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .model_spec import ModelSpec


@contextmanager
def truncated(model: nn.Module, spec: ModelSpec, start: int, end: int | None = None):
    """Within the block, the decoder stack consists of blocks start..end-1 only."""
    parent_name, attr = spec.layers.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    full = getattr(parent, attr)
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    setattr(parent, attr, nn.ModuleList(list(full)[start:end]))
    if layer_types:  # Qwen2 & co index per-layer attention types by position in the list
        config.layer_types = list(layer_types)[start:end]
    try:
        yield
    finally:
        setattr(parent, attr, full)
        if layer_types:
            config.layer_types = layer_types


def run_from(model: nn.Module, spec: ModelSpec, start: int, hidden: torch.Tensor, *,
             position_ids: torch.Tensor | None = None, cache=None,
             attention_mask: torch.Tensor | None = None, end: int | None = None) -> torch.Tensor:
    """Run blocks start..end-1 (default: to the last) and the final norm on `hidden`, the input
    of block `start`.

    hidden  # (B, T, d); without a cache: right-padded rows at positions 0..T-1
    position_ids  # (B, T) when the rows continue a cache (see PrefixCache)
    returns # (B, T, d), the final-normed hidden states (apply the unembedding where needed)
    """
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
    if spec.pos_embed is not None:  # the stack adds learned positions to inputs_embeds: undo it
        hidden = hidden - model.get_submodule(spec.pos_embed)(position_ids).to(hidden.dtype)
    base = model.get_submodule(spec.base)
    kwargs = dict(use_cache=cache is not None, position_ids=position_ids)
    if cache is not None:
        kwargs.update({cache_kwarg(base): cache}, attention_mask=attention_mask)
    with truncated(model, spec, start, end):
        out = base(inputs_embeds=hidden, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def cache_kwarg(module: nn.Module) -> str:
    """The KV cache's keyword in this forward, by its signature: `cache` (transformers 5.2x+; the
    old name is deprecated and goes in 5.40) or `past_key_values`. Models take unknown keywords
    through **kwargs and ignore them, so a wrong name would fail silently, not raise."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under either name (see cache_kwarg)."""
    got = getattr(out, "cache", None)
    return got if got is not None else out.past_key_values


def block_input_site(spec: ModelSpec, i: int) -> tuple[str, str]:
    """Where the input of block i can be read: block i-1's output, or block 0's own input."""
    return (spec.layer(i - 1), "output") if i > 0 else (spec.layer(0), "input")


class PrefixCache:
    """Keys and values of every layer for a right-padded batch, so that later passes can run only
    the tokens from each row's `start` column on (the v* optimisation changes nothing before the
    subject's last token: causal attention).

    Built by one full forward pass. `suffix_inputs` then lays out, per row r, the columns
    start_r..start_r+S-1 as a new (b, S) batch that continues the cache: positions start_r + j, and
    a key mask over [cache columns | new columns] that admits row r's cache columns < start_r only
    (the rest are the stale originals of the recomputed tokens, or padding) and the new tokens.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, ids: torch.Tensor, block_inputs=(),
                 lengths: torch.Tensor | None = None, max_buckets: int = 1):
        """ids (B, T) right-padded; lengths (B,) the real lengths. With max_buckets > 1 the rows are
        run in up to that many groups of similar length, each cut to its own longest row (the
        padding is not computed; results equal the single pass up to rounding)."""
        from .hooks import TraceDict

        where = {i: block_input_site(spec, i) for i in block_inputs}
        names = list(dict.fromkeys(name for name, _ in where.values()))
        base = model.get_submodule(spec.base)  # no LM head: logits are not needed here
        B, T = ids.shape
        groups = [torch.arange(B, device=ids.device)] if lengths is None or max_buckets <= 1 \
            else length_buckets(lengths, max_buckets)
        self.block_inputs: dict[int, torch.Tensor] = {}
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.computed_tokens = 0  # rows × columns actually run (padding included)
        for rows in groups:
            Tb = T if len(groups) == 1 else int(lengths[rows].max())
            sub = ids[rows, :Tb]  # (b, Tb)
            self.computed_tokens += sub.numel()
            with torch.no_grad(), TraceDict(model, names, retain_input=True) as td:
                out = base(input_ids=sub, attention_mask=torch.ones_like(sub), use_cache=True)
            got = {i: getattr(td[name], kind) for i, (name, kind) in where.items()}  # (b, Tb, d)
            kv = [(layer.keys, layer.values) for layer in output_cache(out).layers]  # (b, kv, Tb, hd)
            if len(groups) == 1:
                self.block_inputs, self.layers = got, kv
                break
            if not self.layers:  # zeros beyond each row's length: never admitted by the key mask
                self.block_inputs = {i: h.new_zeros(B, T, h.shape[-1]) for i, h in got.items()}
                self.layers = [(k.new_zeros(B, k.shape[1], T, k.shape[3]), v.new_zeros(B, v.shape[1], T, v.shape[3]))
                               for k, v in kv]
            for i, h in got.items():
                self.block_inputs[i][rows, :Tb] = h
            for (K, V), (k, v) in zip(self.layers, kv):
                K[rows, :, :Tb] = k
                V[rows, :, :Tb] = v
        self.T = T
        self.config = model.config

    def select(self, rows: torch.Tensor):
        """A fresh cache holding these rows' entries (the stored tensors are never modified)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for i, (k, v) in enumerate(self.layers):
            cache.update(k[rows], v[rows], i)
        return cache

    def suffix_inputs(self, start: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """start  # (b,) first recomputed column per row -> position_ids (b, S), key mask (b, T+S)"""
        dev = start.device
        j = torch.arange(S, device=dev)  # (S,)
        position_ids = start[:, None] + j[None]  # (b, S)
        cols = torch.arange(self.T, device=dev)  # (T,)
        new = torch.ones(len(start), S, dtype=torch.bool, device=dev)  # (b, S)
        mask = torch.cat([(cols[None] < start[:, None]), new], 1)  # (b, T+S)
        return position_ids, mask.long()


def length_buckets(lengths: torch.Tensor, max_buckets: int) -> list[torch.Tensor]:
    """Rows grouped by length into at most max_buckets groups minimising the padded tokens
    Σ_g |g| · max length in g (an exact DP over the sorted lengths), each further group charged 5% of
    the unbucketed pass (its own overhead). lengths (B,) -> list of row indices per group."""
    order = torch.argsort(lengths, stable=True)
    ls = lengths[order].tolist()  # ascending
    B, inf = len(ls), float("inf")
    # cost[k][j]: least padded tokens for the first j sorted rows in k groups; cut[k][j]: last group's start
    cost = [[0.0] + [inf] * B] + [[inf] * (B + 1) for _ in range(max_buckets)]
    cut = [[0] * (B + 1) for _ in range(max_buckets + 1)]
    for k in range(1, max_buckets + 1):
        for j in range(1, B + 1):
            for i in range(j):  # last group: sorted rows i..j-1, padded to ls[j-1]
                c = cost[k - 1][i] + (j - i) * ls[j - 1]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    overhead = 0.05 * B * ls[-1]  # a pass costs something beyond its tokens: 5% of the unbucketed pass
    k = min(range(1, max_buckets + 1), key=lambda k: (cost[k][B] + overhead * k, k))
    groups, j = [], B
    while j > 0:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return groups[::-1]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (input embedding) weights live: every tensor an editor makes goes there."""
    return model.get_input_embeddings().weight.device


def unembed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits for the final-normed hidden states x  # (..., d) -> (..., vocab)"""
    return model.get_output_embeddings()(x)


def capture(model: nn.Module, spec: ModelSpec, ids: torch.Tensor, *, block_inputs=(), block_outputs=(),
            mlp_out_inputs=(), mlp_outputs=()) -> dict[str, torch.Tensor]:
    """One forward pass over right-padded `ids` (B, T) that stops after the deepest block needed.

    Returns {"in:i": input of block i, "out:i": output of block i, "key:i": input of block i's MLP
    output projection, "mlp:i": output of block i's MLP}, each (B, T, width).
    """
    from .hooks import TraceDict

    want: dict[str, tuple[str, str]] = {}  # result key -> (module name, "input" | "output")
    for i in block_inputs:
        want[f"in:{i}"] = block_input_site(spec, i)
    for i in block_outputs:
        want[f"out:{i}"] = (spec.layer(i), "output")
    for i in mlp_out_inputs:
        want[f"key:{i}"] = (spec.mlp_out_name(i), "input")
    for i in mlp_outputs:
        want[f"mlp:{i}"] = (spec.mlp_name(i), "output")
    names = list(dict.fromkeys(name for name, _ in want.values()))
    with TraceDict(model, names, retain_input=True, retain_output=True, stop=True) as td:
        # right padding + causal attention: an all-ones mask is exact (see editors.tokens)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return {key: getattr(td[name], kind) for key, (name, kind) in want.items()}
