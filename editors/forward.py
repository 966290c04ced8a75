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
        kwargs.update(past_key_values=cache, attention_mask=attention_mask)
    with truncated(model, spec, start, end):
        out = base(inputs_embeds=hidden, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


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

    def __init__(self, model: nn.Module, spec: ModelSpec, ids: torch.Tensor, block_inputs=()):
        from .hooks import TraceDict

        where = {i: block_input_site(spec, i) for i in block_inputs}
        names = list(dict.fromkeys(name for name, _ in where.values()))
        base = model.get_submodule(spec.base)  # no LM head: logits are not needed here
        with torch.no_grad(), TraceDict(model, names, retain_input=True) as td:
            out = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        self.block_inputs = {i: getattr(td[name], kind) for i, (name, kind) in where.items()}  # (B, T, d)
        cache = out.past_key_values
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]  # (B, kv, T, hd) each
        self.T = ids.shape[1]
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
