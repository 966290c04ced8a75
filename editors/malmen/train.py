"""Meta-training MALMEN's hyper-network (Tan, Zhang & Fu, ICLR 2024, §3.2 and Figure 2).

One meta step on a batch of facts:
  i-ii  one forward/backward of the edit loss on prompt + target_new: keys u and value gradients g
        at the edit tokens, per edited layer (gradients.cache_tokens);
  iii   the hyper-network without autograd: shifts D, normal equation S_ℓ, ΔW_ℓ = S_ℓᵀ (solve.py);
  iv-v  the LM with ΔW applied: meta loss = edit loss on the equivalent prompts (rewrite prompt and
        its first paraphrase, target_new) + loc_coef · KL(pre-edit ‖ post-edit) at the answer tokens
        of the unrelated (neighbourhood) prompts; its gradient G_ℓ wrt each edited W_ℓ;
  vi-vii with A = UᵀU + e^λ I: ∂L/∂D = U A⁻¹ G_ℓᵀ, ∂L/∂λ = −e^λ ⟨A⁻¹ G_ℓᵀ, S⟩; the hyper-network
        runs again with autograd, chunk by chunk, and backpropagates ⟨∂L/∂D, D⟩.
The LM never holds the hyper-network's graph and vice versa: both run in chunks of any size.

Checkpoints are safetensors + JSON (`write_checkpoint` / `read_checkpoint`), never a pickle. The
run itself (files, resume, plots) is driven by knowledger.agent.malmen_train.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..apply import apply_deltas, restore_params, snapshot_params
from ..evaluate import aggregate, fact_metrics
from ..fileio import atomic_write_bytes, atomic_write_text, sha256_bytes
from ..forward import capture, run_from, unembed
from ..requests import EditRequest
from ..result import LayerDelta
from ..tokens import teacher_forced
from .editor import MalmenEditor
from .gradients import cache_requests, edit_loss
from .net import HyperNet
from .solve import Normal, factor


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
        for b, k in enumerate(keys):
            if k in self.rows:
                continue
            # one row at a time, unpadded: a cached row is then a function of its tokens only, not
            # of the batch it first appeared in (batch shapes change float rounding), so a resumed
            # run, whose cache starts empty, computes exactly what the uninterrupted run cached
            with torch.no_grad():
                got = capture(self.model, self.spec, ids[b:b + 1, : lengths[b]], block_inputs=[self.start])
            self.rows[k] = got[f"in:{self.start}"][0].clone()  # (T_b, d)
        hidden = torch.zeros(len(ids), ids.shape[1], self.rows[keys[0]].shape[-1])  # (B, T, d)
        for b, k in enumerate(keys):
            hidden[b, : len(k)] = self.rows[k]
        return run_from(self.model, self.spec, self.start, hidden)


class Trainer:
    """Holds the LM, the hyper-network and its optimiser; `step(facts)` is one meta step."""

    def __init__(self, lm, net: HyperNet, settings: TrainSettings):
        """lm: the model bundle (.model, .tokenizer, .spec), e.g. agent.editing.LoadedModel."""
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
                     tokens=len(cache.u[cfg.layers[0]]),  # rows of the normal equation: what λ met
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


# --- checkpoints: safetensors + JSON, never a pickle ---------------------------------------------------
CHECKPOINT_JSON, CHECKPOINT_TENSORS = "checkpoint.json", "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "knowledger-malmen-checkpoint/1"


class CheckpointError(ValueError):
    """A training checkpoint that cannot (or must not) be loaded."""


def write_checkpoint(folder: str | os.PathLike, state: dict) -> Path:
    """Trainer.state(...) as checkpoint.safetensors (every tensor: the network's, Adam's moments
    and steps) + checkpoint.json (the rest, and the tensors file's sha256), each written atomically;
    the JSON is written last and is the commit point. Returns the JSON's path."""
    from safetensors.torch import save

    folder = Path(folder)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in state["net"].items()}
    opt_scalars: dict[str, dict] = {}
    for idx, entry in state["opt"]["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[key] = value
    data = save(tensors, metadata={"format": CHECKPOINT_FORMAT})
    atomic_write_bytes(folder / CHECKPOINT_TENSORS, data)
    doc = dict(format=CHECKPOINT_FORMAT, tensors_sha256=sha256_bytes(data), step=state["step"],
               history=state["history"], best=state["best"], initialised=state["initialised"],
               meta=state["meta"], opt_param_groups=state["opt"]["param_groups"], opt_scalars=opt_scalars)
    return atomic_write_text(folder / CHECKPOINT_JSON, json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")


def has_checkpoint(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / CHECKPOINT_JSON).exists() or (folder / LEGACY_CHECKPOINT).exists()


def read_checkpoint(folder: str | os.PathLike) -> dict:
    """The state write_checkpoint stored, checked against its recorded sha256. A pickle checkpoint
    (checkpoint.pt, from older versions) is refused: loading a pickle can run arbitrary code."""
    from safetensors.torch import load

    folder = Path(folder)
    if (folder / LEGACY_CHECKPOINT).exists() and not (folder / CHECKPOINT_JSON).exists():
        raise CheckpointError(f"{folder / LEGACY_CHECKPOINT} is a pickle checkpoint; knowledger never "
                              "loads pickles (they can run code): start a new run in another --out")
    try:
        doc = json.loads((folder / CHECKPOINT_JSON).read_text(encoding="utf-8"))
        data = (folder / CHECKPOINT_TENSORS).read_bytes()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the checkpoint in {folder}: {e}") from None
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{folder / CHECKPOINT_JSON} has an unknown format {doc.get('format')!r}")
    if sha256_bytes(data) != doc.get("tensors_sha256"):
        raise CheckpointError(f"{folder / CHECKPOINT_TENSORS} does not match {CHECKPOINT_JSON} "
                              "(torn or edited checkpoint)")
    tensors = load(data)
    net = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    for idx, entry in doc.get("opt_scalars", {}).items():
        opt_state.setdefault(int(idx), {}).update(entry)
    return dict(net=net, opt=dict(state=opt_state, param_groups=doc["opt_param_groups"]), step=doc["step"],
                history=doc["history"], best=doc["best"], initialised=doc["initialised"], meta=doc["meta"])


def check_training_facts(requests: list[EditRequest]) -> None:
    """Meta-training reads every fact's target_true (validation) and a paraphrase (the meta loss's
    equivalent prompt): a one-line error before any training when some fact lacks them."""
    bad = [i for i, r in enumerate(requests) if not r.target_true or not r.paraphrases]
    if bad:
        r = requests[bad[0]]
        raise ValueError(f"train-malmen needs target_true and at least one paraphrase for every fact; "
                         f"{len(bad)} of {len(requests)} lack them (first: fact {bad[0] + 1}, {r.text!r})")
