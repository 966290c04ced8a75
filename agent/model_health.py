"""Model health in an audit: held-out perplexity against the base model's, the edited layers'
norm growth, and the dangers they (and orphan operations) signal. See agent.audit."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from knowledger.agent.jsonutil import iso
from knowledger.agent.live import LiveModel
from knowledger.agent.recipes import settings_hparams
from knowledger.agent.scheduler import EditSettings
from knowledger.agent.workspace import Workspace
from knowledger.ledger import repository as repo
from knowledger.ledger.models import utcnow

if TYPE_CHECKING:
    from knowledger.agent.audit import AuditSettings

PPL_SEQ_LEN = 128
BASE_PPL_KEY = "audit_base_ppl"


def stats_tokens_used(settings: EditSettings, model) -> int:
    """How many corpus tokens the key statistics used (settings, overrides, else the preset)."""
    return int(settings_hparams(settings, model).stats_tokens)


def heldout_corpus(settings: EditSettings, base_sha256: str, stats_tokens: int):
    """(the corpus the statistics came from, None) or (None, why there is none)."""
    from knowledger.editors.corpus import Corpus
    from knowledger.editors.models import cache_root

    if settings.stats_corpus:
        path = Path(settings.stats_corpus)
        if not path.is_file():
            return None, f"the statistics corpus {path} is missing: perplexity not checked"
    else:  # the text the base model sampled for the statistics (editors.stats, seed 0)
        path = cache_root() / "corpora" / f"{base_sha256[:16]}-{stats_tokens}-0.txt"
        if not path.is_file():
            return None, ("no statistics corpus (statistics from sampled text that is not in the "
                          "cache): perplexity not checked; `knowledger apply --corpus FILE` sets one")
    return Corpus.from_path(path), None


def health(ws: Workspace, live: LiveModel, settings: EditSettings, audit: AuditSettings,
           device: torch.device, notes: list[str]) -> dict:
    """Perplexity vs the base model and the edited layers' norm growth (see the module docstring)."""
    from knowledger.editors.health import heldout_chunks, perplexity, weight_norms

    out: dict = dict(perplexity=None, base_perplexity=None, ppl_ratio=None, layers={})
    model, tok = live.model, live.tokenizer
    if audit.audit_heldout_tokens > 0:
        skip = stats_tokens_used(settings, model)
        corpus, why = heldout_corpus(settings, live.base_sha256, skip)
        chunks = None
        if corpus is not None:
            try:
                chunks = heldout_chunks(corpus, tok, audit.audit_heldout_tokens, skip_tokens=skip,
                                        seq_len=PPL_SEQ_LEN)
            except ValueError as e:
                why = f"{e}: perplexity not checked"
        if chunks is None:
            notes.append(why)
            out["note"] = why
        else:
            n = sum(len(c) for c in chunks)
            key = (f"{BASE_PPL_KEY}:{live.base_sha256[:16]}:{corpus.sha256[:16]}:{skip}:"
                   f"{audit.audit_heldout_tokens}")
            with ws.reading() as s:
                cached = repo.get_setting(s, key)
            ppl = perplexity(model, tok, chunks, device=device)
            if cached is None:
                with live.at_base():
                    base_ppl = perplexity(model, tok, chunks, device=device)
                with ws.writing() as s:
                    repo.set_setting(s, key, dict(perplexity=base_ppl, tokens=n, corpus=str(corpus.path),
                                                  computed_at=iso(utcnow())))
            else:
                base_ppl = float(cached["perplexity"])
            out.update(perplexity=ppl, base_perplexity=base_ppl, ppl_ratio=ppl / base_ppl,
                       heldout_tokens=n, corpus=str(corpus.path), skip_tokens=skip)
    params = sorted({(a.delta.layer, a.delta.param) for a in live.active})
    if params:
        layer_of = {}
        for layer, name in params:
            layer_of.setdefault(layer, name)  # one edited projection per layer (editors.model_spec)
        current = {layer: model.get_parameter(name) for layer, name in layer_of.items()}
        base = {layer: live._base_value(name) for layer, name in layer_of.items()}
        norms = weight_norms(current, base)
        out["layers"] = {str(layer): dict(v, param=layer_of[layer]) for layer, v in norms.items()}
    return out


def dangers(h: dict, orphans: list[dict], audit: AuditSettings) -> list[str]:
    found = []
    if h.get("ppl_ratio") is not None and h["ppl_ratio"] > audit.audit_ppl_ratio:
        found.append(f"held-out perplexity {h['perplexity']:.3g} is {h['ppl_ratio']:.3f}× the base "
                     f"model's {h['base_perplexity']:.3g} (> {audit.audit_ppl_ratio:g})")
    for layer, v in h.get("layers", {}).items():
        if v["delta_rel"] > audit.audit_norm_ratio:
            found.append(f"layer {layer}: ||W - W_base|| / ||W_base|| = {v['delta_rel']:.3f} "
                         f"(> {audit.audit_norm_ratio:g})")
    for o in orphans:
        found.append(f"operation seq {o['seq']} ({o['kind']}) is active but none of its facts "
                     f"({', '.join(f'#{i}' for i in o['facts'])}) is applied any more: "
                     f"`knowledger audit --heal` or `knowledger undo --op {o['seq']}` removes it")
    return found
