"""Driving a MALMEN meta-training run (`knowledger train-malmen`): files, resume, plots.

The meta step, validation and the checkpoint format live in knowledger.editors.malmen.train.

Data: a fact file (any layout ledger.facts reads, e.g. CounterFact). The LAST `val_facts` facts
are the held-out validation split and are never trained on; training batches are drawn from the
rest, a fresh seeded permutation per epoch (the order depends on the step only, so a resumed run
sees the same batches as an uninterrupted one).

One meta step on a batch of facts: see editors.malmen.train (the paper's Figure 2).

Outputs in OUT: hypernet.safetensors + config.json (the artefact: the best network by validation
score = mean of efficacy, paraphrase and neighbourhood on the validation facts edited in one batch),
checkpoint.json + checkpoint.safetensors (everything needed to resume; no pickle), training.json (settings and the history) and
training.png (the curves).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from knowledger.editors.fileio import atomic_write_text
from knowledger.editors.malmen import HyperConfig, HyperNet, save_hypernet
from knowledger.editors.malmen.train import (CHECKPOINT_JSON, CheckpointError, LowerCache, Trainer,  # noqa: F401
                                             TrainSettings, batch_at, check_training_facts, has_checkpoint,
                                             read_checkpoint, split, write_checkpoint)
from knowledger.editors.requests import EditRequest

from .editing import LoadedModel

CHECKPOINT, HISTORY = CHECKPOINT_JSON, "training.json"


def plot_history(history: list[dict], path: Path) -> Path:
    """Training curves: meta losses per step (and a running mean), held-out scores per validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if "edit_loss" in h]
    vals = [h["validation"] for h in history if "validation" in h]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in ((axes[0], "edit_loss", "edit loss (equivalent prompts, nats)"),
                           (axes[1], "loc_kl", "locality KL (nats)")):
        xs, ys = [h["step"] for h in steps], [h[key] for h in steps]
        ax.plot(xs, ys, lw=0.6, alpha=0.4)
        k = 20
        if len(ys) >= k:
            ax.plot(xs[k - 1:], [sum(ys[i - k + 1 : i + 1]) / k for i in range(k - 1, len(ys))], lw=1.6,
                    label=f"mean of {k}")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("meta step")
        ax.grid(alpha=0.3)
    for key in ("efficacy", "paraphrase", "neighborhood", "score"):
        axes[2].plot([v["step"] for v in vals], [v.get(key) for v in vals], marker="o", ms=3, label=key)
    axes[2].set_title("held-out facts, edited in one batch", fontsize=10)
    axes[2].set_xlabel("meta step")
    axes[2].set_ylim(0, 1.05)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train(lm: LoadedModel, requests: list[EditRequest], out: str | os.PathLike, settings: TrainSettings,
          *, hyper: HyperConfig | None = None, resume: bool = False, data_meta: dict | None = None,
          progress: bool = True, log=None) -> dict:
    """Meta-train (or resume) a hyper-network on `requests`; returns the training summary.

    The artefact in `out` is always the best network by validation score so far (the last one
    when val_facts is 0)."""
    out = Path(out)
    check_training_facts(requests)  # before anything is loaded or written
    if has_checkpoint(out) and not resume:
        raise ValueError(f"{out} already holds a training run ({CHECKPOINT}); pass --resume "
                              "to continue it, or choose another --out")
    if resume and not has_checkpoint(out):
        raise ValueError(f"nothing to resume: no {CHECKPOINT} in {out}")
    out.mkdir(parents=True, exist_ok=True)
    train_set, val_set = (split(requests, settings.val_facts) if settings.val_facts
                          else (requests, []))
    torch.manual_seed(settings.seed)
    state = read_checkpoint(out) if resume else None  # safetensors + JSON; a pickle is refused
    if state is not None:
        hyper = HyperConfig.from_dict(state["meta"]["hyper"])
        saved = TrainSettings(**{k: v for k, v in state["meta"]["settings"].items()
                                 if k in {f.name for f in fields(TrainSettings)}})
        changed = [k for k in ("batch", "val_facts", "seed", "limit") if getattr(saved, k) != getattr(settings, k)]
        if changed:
            raise ValueError(f"--resume with different {', '.join(changed)} than the run in {out}")
    hyper = hyper or HyperConfig.for_model(lm.model)
    net = HyperNet(hyper).train()
    trainer = Trainer(lm, net, settings)
    meta = dict(hyper=hyper.to_dict(), settings=asdict(settings), model=lm.name,
                model_weights_sha256=lm.weights_sha256, data=data_meta or {},
                train_facts=len(train_set), val_facts=len(val_set))
    history: list[dict] = []
    best, start = None, 0
    if state is not None:
        trainer.load(state)
        history, best, start = state["history"], state["best"], state["step"]
    t_start, budget = time.perf_counter(), (settings.max_minutes or 0) * 60
    stopped = "steps"

    def save_ckpt(step):
        write_checkpoint(out, trainer.state(step, history, best, meta))
        summary = json.dumps(dict(meta=meta, best=best, steps_done=step, history=history), indent=1,
                             sort_keys=True, default=str)
        atomic_write_text(out / HISTORY, summary + "\n")

    def validate_and_keep(step):
        nonlocal best
        seen = [h["tokens"] for h in history if "tokens" in h]
        if seen:  # the batch λ was learned at, in normal-equation rows (editors.malmen.editor)
            meta["train_tokens"] = round(sum(seen) / len(seen), 1)
        if not val_set:
            save_hypernet(net, out, dict(meta, step=step, validation=None))
            return
        v = dict(trainer.validate(val_set), step=step)
        history.append(dict(step=step, validation=v))
        if log:
            log(f"step {step}: validation " + ", ".join(f"{k} {v[k]:.3f}" for k in
                                                        ("efficacy", "paraphrase", "neighborhood", "score")))
        if best is None or v["score"] > best["score"]:
            best = v
            best["sha256"] = save_hypernet(net, out, dict(meta, step=step, validation=v))

    bar = tqdm(total=settings.steps, initial=start, desc="train-malmen", unit="step", disable=not progress)
    step = start
    try:
        if start == 0 and val_set:  # the untrained network's score: the bar every later one must beat
            primed = trainer.prime([train_set[i] for i in batch_at(len(train_set), 0, settings.batch, settings.seed)])
            meta["train_tokens"] = float(len(primed.u[hyper.layers[0]]))  # the batch λ was set on
            validate_and_keep(0)
        while step < settings.steps:
            idx = batch_at(len(train_set), step, settings.batch, settings.seed)
            stats = trainer.step([train_set[i] for i in idx])
            step += 1
            history.append(dict(step=step, **{k: (round(v, 5) if isinstance(v, float) else v)
                                              for k, v in stats.items()}))
            bar.update(1)
            bar.set_postfix(edit=f"{stats['edit_loss']:.2f}", kl=f"{stats['loc_kl']:.3f}",
                            acc=f"{stats['edit_token_acc']:.2f}")
            if step % settings.val_every == 0 and step < settings.steps:
                validate_and_keep(step)
            if step % settings.ckpt_every == 0:
                save_ckpt(step)
            if budget and time.perf_counter() - t_start > budget:
                stopped = "time budget"
                break
    finally:
        bar.close()
    if not history or history[-1].get("validation", {}).get("step") != step:
        validate_and_keep(step)
    save_ckpt(step)
    plot_history(history, out / "training.png")
    return dict(out=str(out), steps_done=step, stopped=stopped, best=best,
                seconds=time.perf_counter() - t_start, train_facts=len(train_set), val_facts=len(val_set))
