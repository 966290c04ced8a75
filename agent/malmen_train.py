"""Meta-training MALMEN's hyper-network (`knowledger train-malmen`).

Data: a fact file (any layout ledger.facts reads, e.g. CounterFact). The LAST `val_facts` facts
are the held-out validation split and are never trained on; training batches are drawn from the
rest, a fresh seeded permutation per epoch (the order depends on the step only, so a resumed run
sees the same batches as an uninterrupted one).

One meta step on a batch of facts (the paper's Figure 2):
  i-ii  one forward/backward of the edit loss on prompt + target_new: keys u and value gradients g
        at the edit tokens, per edited layer (editors.malmen.cache_tokens);
  iii   the hyper-network without autograd: shifts D, normal equation S_ℓ, ΔW_ℓ = S_ℓᵀ;
  iv-v  the LM with ΔW applied: meta loss = edit loss on the equivalent prompts (rewrite prompt and
        its first paraphrase, target_new) + loc_coef · KL(pre-edit ‖ post-edit) at the answer tokens
        of the unrelated (neighbourhood) prompts; its gradient G_ℓ wrt each edited W_ℓ;
  vi-vii with A = UᵀU + e^λ I: ∂L/∂D = U A⁻¹ G_ℓᵀ, ∂L/∂λ = −e^λ ⟨A⁻¹ G_ℓᵀ, S⟩; the hyper-network
        runs again with autograd, chunk by chunk, and backpropagates ⟨∂L/∂D, D⟩.
The LM never holds the hyper-network's graph and vice versa: both run in chunks of any size.

Outputs in OUT: hypernet.safetensors + config.json (the artefact: the best network by validation
score = mean of efficacy, paraphrase and neighbourhood on the validation facts edited in one batch),
checkpoint.pt (everything needed to resume), training.json (settings and the history) and
training.png (the curves).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from knowledger.editors.apply import apply_deltas, restore_params, snapshot_params
from knowledger.editors.evaluate import aggregate, fact_metrics
from knowledger.editors.forward import capture, run_from, unembed
from knowledger.editors.malmen import (HyperConfig, HyperNet, MalmenEditor, Normal, cache_requests,
                                       edit_loss, factor, save_hypernet)
from knowledger.editors.requests import EditRequest
from knowledger.editors.result import LayerDelta
from knowledger.editors.tokens import teacher_forced

from .editing import LoadedModel

CHECKPOINT, HISTORY = "checkpoint.pt", "training.json"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 500  # meta steps (batches)
    batch: int = 64  # facts per meta step
    val_facts: int = 200  # the file's last facts, held out
    val_every: int = 100  # steps between validations (and at the end)
    ckpt_every: int = 25  # steps between checkpoints
    meta_lr: float = 1e-4  # Adam on the blocks' weights, scales and shifts
    log_lr: float = 1e-2  # Adam on log lr_ℓ and λ_ℓ (log space)
    loc_coef: float = 1.0  # weight of the locality KL in the meta loss
    init_shift: float = 0.25  # initial lr: median ‖d‖ = init_shift · median ‖v‖ on the first batch
    max_minutes: float | None = None  # stop (validate, save) after this much wall time
    seed: int = 0
    limit: int | None = None  # use only the file's first `limit` facts (validation included)

    def __post_init__(self):
        for name in ("steps", "batch", "val_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1")
        if self.val_facts < 0:
            raise ValueError("val_facts must be ≥ 0")


def split(requests: list[EditRequest], val_facts: int) -> tuple[list[EditRequest], list[EditRequest]]:
    """(train, validation): the validation split is the last val_facts facts."""
    if len(requests) <= val_facts:
        raise ValueError(f"{len(requests)} facts leave nothing to train on after {val_facts} for validation")
    cut = len(requests) - val_facts
    return requests[:cut], requests[cut:]


def batch_at(n: int, step: int, size: int, seed: int) -> list[int]:
    """Indices of step's batch: epochs of seeded permutations, a function of the step alone."""
    size = min(size, n)
    per_epoch = n // size
    epoch, k = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * size : (k + 1) * size]


class LowerCache:
    """Inputs of the first edited block for every token row seen, computed once per row.

    Meta-training never changes the blocks below the first edited layer, so their output for a
    given row is the same at every step; from the second epoch on only the edited blocks run
    (`final`). Rows are keyed by their token ids; memory: T·d floats per row (1.1 GB for 10,000
    CounterFact facts' rewrite, paraphrase and neighbourhood rows on the default model)."""

    def __init__(self, model, spec, start: int):
        self.model, self.spec, self.start = model, spec, start
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}

    def final(self, tf) -> torch.Tensor:
        """run(tf) for cache_tokens: the final-normed hidden states (B, T, d)."""
        ids, lengths = tf.batch.ids, tf.batch.lengths
        keys = [tuple(ids[b, : lengths[b]].tolist()) for b in range(len(ids))]
        todo = [b for b, k in enumerate(keys) if k not in self.rows]
        if todo:
            with torch.no_grad():
                got = capture(self.model, self.spec, ids[todo], block_inputs=[self.start])
            h = got[f"in:{self.start}"]  # (b, T, d)
            for j, b in enumerate(todo):
                self.rows[keys[b]] = h[j, : lengths[b]].clone()
        hidden = torch.zeros(len(ids), ids.shape[1], self.rows[keys[0]].shape[-1])  # (B, T, d)
        for b, k in enumerate(keys):
            hidden[b, : len(k)] = self.rows[k]
        return run_from(self.model, self.spec, self.start, hidden)


class Trainer:
    """Holds the LM, the hyper-network and its optimiser; `step(facts)` is one meta step."""

    def __init__(self, lm: LoadedModel, net: HyperNet, settings: TrainSettings):
        self.lm, self.net, self.st = lm, net, settings
        self.spec = lm.spec
        slow = [p for n, p in net.named_parameters() if n not in ("log_lr", "log_lambda")]
        self.opt = torch.optim.Adam([{"params": slow, "lr": settings.meta_lr},
                                     {"params": [net.log_lr, net.log_lambda], "lr": settings.log_lr}])
        self.initialised = False
        self._primed: tuple = ()
        self.names = [self.spec.weight_name(l) for l in net.config.layers]
        self.lower = LowerCache(lm.model, self.spec, net.config.layers[0])

    # --- the meta step ---------------------------------------------------------------------------
    def step(self, facts: list[EditRequest]) -> dict:
        net, cfg, model, tok = self.net, self.net.config, self.lm.model, self.lm.tokenizer
        t0 = time.perf_counter()
        cache = self.prime(facts)  # i-ii
        t_cache = time.perf_counter() - t0

        lam = [float(x) for x in net.log_lambda.detach()]  # the step's λ: unchanged until opt.step
        chol, S = {}, {}  # iii; A's Cholesky factor serves S here and A⁻¹ ∂L/∂S below
        with torch.no_grad():
            for i, l in enumerate(cfg.layers):
                normal = Normal.empty(cfg.d_in, cfg.d_out)
                normal.add(cache.u[l], net.shifts(i, cache.u[l], cache.g[l]))
                chol[l] = normal.factor(lam[i])
                S[l] = torch.cholesky_solve(normal.utd, chol[l])

        t = time.perf_counter()
        grads, stats = self._meta_grads(facts, S)  # iv-v
        t_lm = time.perf_counter() - t

        self.opt.zero_grad(set_to_none=False)  # vi-vii
        lam_grad = torch.zeros_like(net.log_lambda)
        for i, l in enumerate(cfg.layers):
            G = self.spec.to_math(grads[l]).T.double()  # ∂L/∂S (d_in, d_out)
            X = torch.cholesky_solve(G, chol[l])  # A⁻¹ ∂L/∂S
            lam_grad[i] = -math.exp(lam[i]) * float((X * S[l]).sum())
            grad_d = (cache.u[l].double() @ X).float()  # ∂L/∂D (n, d_out)
            step = cfg.net_batch
            for s in range(0, len(grad_d), step):
                d = net(i, cache.u[l][s : s + step], cache.g[l][s : s + step])
                (d * grad_d[s : s + step]).sum().backward()
        net.log_lambda.grad = lam_grad if net.log_lambda.grad is None else net.log_lambda.grad + lam_grad
        self.opt.step()
        stats.update(cache_s=t_cache, lm_s=t_lm, step_s=time.perf_counter() - t0,
                     edit_loss_before=cache.loss / len(facts),
                     lr=[round(float(x), 6) for x in net.log_lr.detach().exp()],
                     log_lambda=[round(float(x), 3) for x in net.log_lambda.detach()])
        return stats

    def prime(self, facts: list[EditRequest]):
        """Cache a batch's edit tokens and merge them into the normalisation statistics (once per
        batch: a batch primed before the first validation is not merged again by its step); the
        very first batch also sets the initial lr_ℓ and λ_ℓ."""
        cfg = self.net.config
        cache = cache_requests(self.lm.model, self.lm.tokenizer, self.spec, cfg.layers, facts,
                               cfg.lm_batch, run=self.lower.final)
        key = tuple(id(f) for f in facts)
        if key != self._primed:
            for i, l in enumerate(cfg.layers):
                self.net.norm.update(i, torch.cat([cache.u[l], cache.g[l]], -1))
        self._primed = key
        if not self.initialised:
            self._initialise(cache)
        return cache

    def _initialise(self, cache) -> None:
        """lr_ℓ so that the untrained network's median ‖d‖ is init_shift · median ‖v‖, and
        e^λ_ℓ = tr(UᵀU)/d_in (the mean eigenvalue), both measured on the first batch."""
        net, cfg = self.net, self.net.config
        with torch.no_grad():
            for i, l in enumerate(cfg.layers):
                u = cache.u[l]
                d = net.shifts(i, u, cache.g[l]) / net.log_lr[i].exp()  # at lr = 1
                want = self.st.init_shift * cache.v_norm[l]
                net.log_lr[i] = float(torch.log(torch.tensor(want) / d.norm(dim=-1).median().clamp_min(1e-12)))
                net.log_lambda[i] = float(torch.log((u.double() ** 2).sum() / cfg.d_in).clamp_min(-30))
        self.initialised = True

    def _meta_grads(self, facts: list[EditRequest], S: dict) -> tuple[dict, dict]:
        """Apply ΔW = Sᵀ, and return ∂L_meta/∂W (stored layout) per layer, and loss statistics."""
        model, tok, spec, cfg = self.lm.model, self.lm.tokenizer, self.spec, self.net.config
        gen = [(p, r.target_new) for r in facts for p in (r.text, *r.paraphrases[:1])]
        loc = [(p, a) for r in facts for p, a in r.neighborhood[:1]]
        chunk = cfg.lm_batch
        pre = []  # pre-edit log-probabilities at the locality answer tokens, per chunk
        with torch.no_grad():
            for s in range(0, len(loc), chunk):
                tf = teacher_forced(tok, loc[s : s + chunk])
                h = self.lower.final(tf)
                pre.append(F.log_softmax(unembed(model, h[tf.rows, tf.cols]).float(), -1))
        saved = snapshot_params(model, self.names)
        weights = [model.get_parameter(n) for n in self.names]
        grads = [torch.zeros_like(w) for w in weights]
        edit_sum = kl_sum = hits = n_tok = 0.0
        try:
            apply_deltas(model, spec, [LayerDelta(l, spec.weight_name(l), *(f.float() for f in factor(S[l])))
                                       for l in cfg.layers])
            for w in weights:
                w.requires_grad_(True)
            for s in range(0, len(gen), chunk):
                tf = teacher_forced(tok, gen[s : s + chunk])
                h = self.lower.final(tf)
                loss = edit_loss(model, tf, h) / len(gen)
                with torch.no_grad():
                    logits = unembed(model, h[tf.rows, tf.cols])
                    hits += float((logits.argmax(-1) == tf.targets).sum())
                    n_tok += len(tf.targets)
                for acc, g in zip(grads, torch.autograd.grad(loss, weights)):
                    acc += g
                edit_sum += float(loss.detach()) * len(gen)
            for k, s in enumerate(range(0, len(loc), chunk)):
                tf = teacher_forced(tok, loc[s : s + chunk])
                h = self.lower.final(tf)
                post = F.log_softmax(unembed(model, h[tf.rows, tf.cols]).float(), -1)  # (m, V)
                kl = (pre[k].exp() * (pre[k] - post)).sum(-1)  # (m,) KL(pre ‖ post) per token
                loss = self.st.loc_coef * tf.per_item_mean(kl).sum() / len(loc)
                for acc, g in zip(grads, torch.autograd.grad(loss, weights)):
                    acc += g
                kl_sum += float(tf.per_item_mean(kl.detach()).sum())
        finally:
            for w in weights:
                w.requires_grad_(False)
            restore_params(model, saved)
        stats = dict(edit_loss=edit_sum / max(len(gen), 1), loc_kl=kl_sum / max(len(loc), 1),
                     edit_token_acc=hits / max(n_tok, 1))
        return dict(zip(cfg.layers, grads)), stats

    # --- validation -------------------------------------------------------------------------------
    def validate(self, facts: list[EditRequest]) -> dict:
        """Edit the validation facts in ONE batch, score them, restore the model."""
        model = self.lm.model
        t = time.perf_counter()
        result = MalmenEditor(model, self.lm.tokenizer, self.net).compute(facts)
        saved = snapshot_params(model, self.names)
        try:
            apply_deltas(model, self.spec, result.deltas)
            m = aggregate(fact_metrics(model, self.lm.tokenizer, facts))
        finally:
            restore_params(model, saved)
            self.net.train()
        out = {k: m[k] for k in ("efficacy", "paraphrase", "neighborhood", "efficacy_acc",
                                 "paraphrase_acc", "neighborhood_acc") if k in m}
        out["score"] = (out["efficacy"] + out.get("paraphrase", out["efficacy"])
                        + out.get("neighborhood", 1.0)) / 3
        out["seconds"] = time.perf_counter() - t
        return out

    # --- checkpoints ------------------------------------------------------------------------------
    def state(self, step: int, history: list, best: dict | None, meta: dict) -> dict:
        return dict(net=self.net.state_dict(), opt=self.opt.state_dict(), step=step, history=history,
                    best=best, initialised=self.initialised, meta=meta)

    def load(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.initialised = state["initialised"]


def _atomic(path: Path, write) -> None:
    """write(tmp) to a temp name beside `path`, then rename: a reader sees the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


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
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not resume:
        raise ValueError(f"{out} already holds a training run ({CHECKPOINT}); pass --resume "
                              "to continue it, or choose another --out")
    if resume and not ckpt.exists():
        raise ValueError(f"nothing to resume: no {CHECKPOINT} in {out}")
    out.mkdir(parents=True, exist_ok=True)
    train_set, val_set = (split(requests, settings.val_facts) if settings.val_facts
                          else (requests, []))
    torch.manual_seed(settings.seed)
    state = torch.load(ckpt, weights_only=False) if resume else None
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
        _atomic(ckpt, lambda tmp: torch.save(trainer.state(step, history, best, meta), tmp))
        summary = json.dumps(dict(meta=meta, best=best, steps_done=step, history=history), indent=1,
                             sort_keys=True, default=str)
        _atomic(out / HISTORY, lambda tmp: tmp.write_text(summary + "\n", encoding="utf-8"))

    def validate_and_keep(step):
        nonlocal best
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
            trainer.prime([train_set[i] for i in batch_at(len(train_set), 0, settings.batch, settings.seed)])
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
