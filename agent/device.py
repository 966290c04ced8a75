"""Where a command computes: `--device` resolved (default: CUDA when present), and a model moved
there for the duration of a block."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from knowledger.agent.errors import KnowledgerError


def default_device() -> str:
    """CUDA when present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None = "auto") -> torch.device:
    """"auto" (or None): CUDA when present, else the CPU; anything else as torch spells it."""
    if device in (None, "auto"):
        return torch.device(default_device())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KnowledgerError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}") from e


@contextmanager
def on_device(model, device: torch.device):
    """The model on `device` for the duration, then back where it was."""
    home = next(model.parameters()).device
    if home == device:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
