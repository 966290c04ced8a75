"""Direct editing without the ledger: load a model, resolve its hyperparameters, gather key
statistics, edit, evaluate, save. `knowledger edit` calls `edit_facts`; `knowledger bench` and
`train-malmen` stand on `prepare` and `open_model` too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from knowledger.agent.loaded import LoadedModel, open_model
from knowledger.agent.anchors import PILOT_METHOD, measure, site_of, wants_anchor
from knowledger.agent.recipes import direct_editor, resolve_hparams
from knowledger.agent.scheduler import MALMEN
from knowledger.editors.apply import apply_deltas
from knowledger.editors.hparams import EditHParams
from knowledger.editors.progress import Progress, track


def prepare(model: str | None, preset: str | None = None, overrides: dict | None = None,
            stats_tokens: int | None = None, *, device: str | None = None) -> tuple[LoadedModel, EditHParams]:
    """(the loaded model, its hyperparameters): what edit and bench start from."""
    lm = open_model(model, device=device)
    return lm, resolve_hparams(lm.model, preset, overrides, stats_tokens)


def apply_result(lm: LoadedModel, result) -> dict[str, str]:
    return apply_deltas(lm.model, lm.spec, result.deltas)


def save_model(lm: LoadedModel, out: str | os.PathLike) -> Path:
    """Write the loaded model as a Hugging Face folder, atomically (agent.export.write_hf_folder)."""
    from knowledger.agent.export import write_hf_folder

    return write_hf_folder(lm.model, lm.tokenizer, out)


def requests_from_facts(facts) -> list:
    """ledger.facts.Fact objects -> editor requests."""
    from knowledger.editors.requests import EditRequest

    return [EditRequest(prompt=f.prompt, subject=f.subject, target_new=f.target_new,
                        target_true=f.target_true, paraphrases=tuple(f.paraphrases),
                        neighborhood=tuple((p, a) for p, a in f.neighborhood)) for f in facts]


def with_anchor(lm: LoadedModel, method: str, hp: EditHParams, corpus=None, *,
                progress: Progress | None = None, measured: dict | None = None,
                clean: bool = True) -> EditHParams:
    """hp, with `nas_anchor` measured now from the pilot facts on the model as loaded (taken to be
    the clean one) when `nas` is on and no anchor is given (NAS without a ledger); else hp as is.
    measured: a dict kept by the caller so that editors of one site share one measurement; clean
    False (the model has been edited since it was loaded) refuses to measure."""
    if not wants_anchor(method, hp):
        return hp
    site, measured = site_of(method), {} if measured is None else measured
    if site not in measured:
        if not clean:
            raise ValueError(f"nas is on and the {site} anchor was not measured before the first edit: "
                             "pass nas_anchor (e.g. --set nas_anchor=...)")
        pilot = direct_editor(lm, PILOT_METHOD[site], hp.replace(nas=False), corpus, progress=progress)
        measured[site] = measure(pilot, progress=progress)[0].norm
    return hp.replace(nas_anchor=measured[site])


def direct_edit(lm: LoadedModel, requests: list, *, method: str, hp: EditHParams, corpus=None,
                progress: Progress | None = None, top_k: int = 3, hypernet=None) -> dict:
    """Edit the loaded model in place (no ledger) and report before/after top tokens per prompt.

    ROME edits one fact at a time, so several facts are applied one after another. With `nas` on
    and no `nas_anchor`, the anchor is measured first from the pilot facts (agent.anchors.measure)
    on the model as loaded, which is taken to be the clean one.
    """
    from knowledger.editors.apply import apply_from_base, snapshot_params
    from knowledger.editors.evaluate import fact_metrics, top_tokens
    from knowledger.editors.methods import get_method

    def probe():
        return [{p: top_tokens(lm.model, lm.tokenizer, p, top_k) for p in (r.text, *r.paraphrases,
                                                                           *(q for q, _ in r.neighborhood))}
                for r in requests]

    hp = with_anchor(lm, method, hp, corpus, progress=progress)
    editor = direct_editor(lm, method, hp, corpus, progress=progress, hypernet=hypernet)
    before = probe()
    groups = get_method(method).batches(requests)  # ROME: one fact per batch
    timings: dict[str, float] = {}
    value_stats, applied = [], []
    base = snapshot_params(lm.model, [lm.spec.weight_name(l) for l in editor.layers])
    for group in track(groups, progress, "edit"):
        res = editor.compute(group)
        applied += res.deltas  # composed from the base, as the ledger does: same bits as apply + export
        apply_from_base(lm.model, lm.spec, base, applied)
        value_stats += res.value_stats
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    after = probe()
    metrics = fact_metrics(lm.model, lm.tokenizer, requests)
    return {"editor": method, "layers": list(editor.layers), "stats_s": lm.stats_s, "timings": timings,
            "facts": [{"prompt": r.text, "target_new": r.target_new, "target_true": r.target_true,
                       "before": b, "after": a, "metrics": m, "v_star": s}
                      for r, b, a, m, s in zip(requests, before, after, metrics,
                                               value_stats or [None] * len(requests))]}


def loaded(model, tokenizer, name: str = "in-memory model") -> LoadedModel:
    """A LoadedModel around a model the caller already loaded (no copy: edits change it)."""
    from knowledger.editors.model_spec import spec_for
    from knowledger.editors.models import weights_sha256

    return LoadedModel(name=name, model=model, tokenizer=tokenizer, spec=spec_for(model),
                       weights_sha256=weights_sha256(model))


def edit_loaded(model, tokenizer, facts, *, editor: str = "emmet", preset: str | None = None,
                overrides: dict | None = None, stats_tokens: int | None = None, corpus=None,
                hypernet=None, progress: Progress | None = None) -> DirectEditResult:
    """Edit `facts` (ledger.facts.Fact) into a model the caller loaded, in place."""
    lm = loaded(model, tokenizer)
    hp = resolve_hparams(model, preset, overrides, stats_tokens)
    return DirectEditResult(**direct_edit(lm, requests_from_facts(facts), method=editor, hp=hp,
                                          corpus=corpus, progress=progress, hypernet=hypernet))


@dataclass(frozen=True)
class DirectEditResult:
    """`knowledger edit`: per fact the top tokens before and after, the layers, the timings."""

    editor: str
    layers: list[int]
    stats_s: float
    timings: dict
    facts: list[dict]
    saved_to: str | None = None

    @property
    def is_malmen(self) -> bool:
        return self.editor == MALMEN


def edit_facts(facts, *, model: str | None = None, editor: str = "emmet", preset: str | None = None,
               overrides: dict | None = None, stats_tokens: int | None = None, corpus=None,
               hypernet=None, out: str | os.PathLike | None = None, device: str | None = None,
               progress: Progress | None = None) -> DirectEditResult:
    """Load `model`, edit `facts` (ledger.facts.Fact) into it, optionally save it to `out`."""
    lm, hp = prepare(model, preset, overrides, stats_tokens, device=device)
    r = direct_edit(lm, requests_from_facts(facts), method=editor, hp=hp, corpus=corpus,
                    progress=progress, hypernet=hypernet)
    saved = str(save_model(lm, out)) if out else None
    return DirectEditResult(**r, saved_to=saved)


def train_hypernet(data, out, *, model: str | None = None, settings=None, layers=None, rank: int = 128,
                   blocks: int = 2, resume: bool = False, device: str | None = None,
                   progress: Progress | None = None, log=None) -> dict:
    """`knowledger train-malmen`: meta-train a MALMEN hyper-network on a fact file
    (agent.malmen_train.train), recording the data file's path, sha256 and fact counts."""
    from knowledger.agent.bench import load_requests
    from knowledger.agent.errors import KnowledgerError
    from knowledger.agent.malmen_train import check_training_facts, train
    from knowledger.editors.fileio import sha256_file
    from knowledger.editors.malmen import HyperConfig

    requests, skipped = load_requests(Path(data), settings.limit if settings is not None else None)
    if len(requests) < 2:
        raise KnowledgerError(f"{data}: fewer than 2 valid facts")
    check_training_facts(requests)  # target_true and a paraphrase per fact, before the model loads
    lm = open_model(model, device=device)
    hyper = None if resume else HyperConfig.for_model(lm.model, layers, rank=rank, n_blocks=blocks)
    data_meta = dict(path=str(Path(data).resolve()), sha256=sha256_file(data), facts=len(requests),
                     skipped=skipped)
    return train(lm, requests, out, settings, hyper=hyper, resume=resume, data_meta=data_meta,
                 progress=progress, log=log)
