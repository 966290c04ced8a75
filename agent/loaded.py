"""A model loaded for editing: the model, its tokenizer, its architecture spec, its weights hash
and the key statistics gathered for it. Both the ledger path (agent.live) and direct editing
(agent.direct) stand on it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from knowledger.editors.model_spec import ModelSpec, spec_for
from knowledger.editors.models import load_model, weights_sha256


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    weights_sha256: str
    load_s: float = 0.0
    stats: dict[int, torch.Tensor] = field(default_factory=dict)
    stats_s: float = 0.0


def open_model(name_or_path: str | None = None, *, device: str | torch.device | None = None) -> LoadedModel:
    """Load a model (the default one for None) and hash its weights.

    device: where the model should live (None: where editors.models.load_model puts it).
    """
    t = time.perf_counter()
    model, tokenizer = load_model(name_or_path, **({} if device is None else dict(device=device)))
    spec = spec_for(model)
    sha = weights_sha256(model)
    return LoadedModel(name=name_or_path or "default", model=model, tokenizer=tokenizer, spec=spec,
                       weights_sha256=sha, load_s=time.perf_counter() - t)
