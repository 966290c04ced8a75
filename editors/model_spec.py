"""The architecture table: where each model family keeps the parts an editor touches.

One place knows, per `config.model_type`, the decoder-layer list, the MLP output projection that
locate-then-edit methods rewrite (and how its weight is oriented), the attention output projection
(PMET), the final norm, the embedding and the unembedding. Everything else asks this table; no
module name is assembled from strings anywhere else, and orientation is never guessed from a shape.

Orientation: the "math" view of an edited projection is W (d_out, d_in) with out = W @ k.
- "linear": torch.nn.Linear stores weight as (d_out, d_in) = W.
- "conv1d": GPT-2's transformers Conv1D stores weight as (d_in, d_out) = Wᵀ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Orientation = Literal["linear", "conv1d"]


class UnsupportedArchitecture(ValueError):
    """A model family the architecture table does not know."""


@dataclass(frozen=True)
class ModelSpec:
    family: str
    layers: str  # dotted path of the ModuleList of decoder blocks, e.g. "model.layers"
    mlp: str  # MLP submodule, relative to a block
    mlp_out: str  # MLP output projection (the edited matrix), relative to a block
    attn: str  # attention submodule, relative to a block
    attn_out: str  # attention output projection, relative to a block
    final_norm: str  # dotted path from the model root
    embed: str  # token embedding, from the root
    unembed: str  # output head (may share its weight with `embed`), from the root
    orientation: Orientation  # of mlp_out's weight, see the module docstring
    pos_embed: str | None = None  # learned absolute position embedding added to inputs_embeds

    @property
    def base(self) -> str:
        """The decoder stack without the LM head (what takes `inputs_embeds`), e.g. "model"."""
        return self.layers.rsplit(".", 1)[0]

    # --- dotted names, the only place they are built -------------------------------------
    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def mlp_name(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.mlp}"

    def mlp_out_name(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.mlp_out}"

    def attn_name(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.attn}"

    def attn_out_name(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.attn_out}"

    def weight_name(self, i: int) -> str:
        """Parameter name of the edited weight of layer i (as in model.state_dict())."""
        return f"{self.mlp_out_name(i)}.weight"

    # --- module access ---------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def mlp_out_module(self, model: nn.Module, i: int) -> nn.Module:
        return model.get_submodule(self.mlp_out_name(i))

    def edited_weight(self, model: nn.Module, i: int) -> nn.Parameter:
        return self.mlp_out_module(model, i).weight

    def to_math(self, weight: torch.Tensor) -> torch.Tensor:
        """Stored weight -> W (d_out, d_in)."""
        return weight.T if self.orientation == "conv1d" else weight

    def from_math(self, w: torch.Tensor) -> torch.Tensor:
        """W (d_out, d_in) -> the stored weight's layout."""
        return w.T if self.orientation == "conv1d" else w

    def mlp_dims(self, model: nn.Module, i: int = 0) -> tuple[int, int]:
        """(d_out, d_in) of the edited projection: (hidden size, MLP width)."""
        w = self.to_math(self.edited_weight(model, i))
        return int(w.shape[0]), int(w.shape[1])


_LLAMA_LIKE = dict(
    layers="model.layers",
    mlp="mlp",
    mlp_out="mlp.down_proj",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    final_norm="model.norm",
    embed="model.embed_tokens",
    unembed="lm_head",
    orientation="linear",
)

SPECS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(
        family="gpt2",
        layers="transformer.h",
        mlp="mlp",
        mlp_out="mlp.c_proj",
        attn="attn",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        unembed="lm_head",
        orientation="conv1d",
        pos_embed="transformer.wpe",
    ),
    "gptj": ModelSpec(
        family="gptj",
        layers="transformer.h",
        mlp="mlp",
        mlp_out="mlp.fc_out",
        attn="attn",
        attn_out="attn.out_proj",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        unembed="lm_head",
        orientation="linear",
    ),
    "gpt_neox": ModelSpec(
        family="gpt_neox",
        layers="gpt_neox.layers",
        mlp="mlp",
        mlp_out="mlp.dense_4h_to_h",
        attn="attention",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
        unembed="embed_out",
        orientation="linear",
    ),
    **{
        name: ModelSpec(family=name, **_LLAMA_LIKE)
        for name in ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    },
}


def spec_for(model_or_config) -> ModelSpec:
    """The ModelSpec for a model (or its config), keyed by config.model_type."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return SPECS[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}: add a ModelSpec for it to SPECS in "
            f"knowledger/editors/model_spec.py (known: {', '.join(sorted(SPECS))})"
        ) from None
