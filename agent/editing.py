"""Kept for callers of the old names: LoadedModel and open_model live in agent.loaded, direct
editing in agent.direct, hyperparameters and editors in agent.recipes, write_hf_folder in
agent.export."""
from __future__ import annotations

from knowledger.agent.direct import apply_result, direct_edit, requests_from_facts, save_model
from knowledger.agent.export import write_hf_folder
from knowledger.agent.loaded import LoadedModel, open_model
from knowledger.agent.recipes import direct_editor as make_editor, ensure_stats


def resolve_hparams(lm: LoadedModel, preset: str | None = None, overrides: dict | None = None):
    from knowledger.agent.recipes import resolve_hparams as resolve

    return resolve(lm.model, preset, overrides)


__all__ = ["LoadedModel", "apply_result", "direct_edit", "ensure_stats", "make_editor", "open_model",
           "requests_from_facts", "resolve_hparams", "save_model", "write_hf_folder"]
