"""Target values v*: the residual-stream change that makes the model say target_new.

For each fact we optimise δ (d,) added to the output of the last edited layer L at the last subject
token, over the bare rewrite prompt and a few model-generated context prefixes, so that the model
puts its mass on target_new; a KL term on "{subject} is a" keeps the subject's other predictions,
a weight decay and a norm clamp keep δ small (MEMIT §3.2; EMMET uses the same targets).
PMET ("PMET: Precise Model Editing in a Transformer") optimises two vectors instead, one added to
the attention output and one to the MLP output of layer L, and only the MLP part becomes the target
(editors.pmet).

Speed (see ../shared/REFERENCE.md, "where its time goes"):
- all facts of a batch are optimised together, each with its own δ and its own Adam state;
- the blocks below L run once (cached); each step runs only the blocks above (editors.forward);
- logits are computed only at the positions the loss reads, not over the whole sequence;
- a fact stops as soon as target_new is top-1 at every target position of every prompt for
  `early_stop_patience` steps (or its NLL falls below `early_stop_loss`), and leaves the batch.

`v_prefix_cache=False` switches the step to the reference implementation's (`_full_forward`: the
whole model, all positions, full-vocabulary logits every step); with `early_stop=False`, `v_batch=1`
and 25 steps it is the reference's v* configuration, the baseline bench/speed.py times knowledger
against. Both steps compute the same loss. Each fact's stats record `steps_to_loss`: the steps after
which its total loss first fell below `early_stop_loss` (the reference's own stopping rule).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .contexts import CONTEXT_SEEDS, context_prefixes  # noqa: F401 (moved; editor imports them here)
from .forward import PrefixCache, capture, model_device, run_from, unembed
from .hooks import TraceDict
from .hparams import EditHParams
from .model_spec import ModelSpec
from .pmet import run_with_component_deltas
from .progress import Progress
from .requests import EditRequest
from .tokens import encode_with_subject, pad_id, pad_right, target_ids

KL_TEMPLATE = "{} is a"
@dataclass
class ValueTargets:
    delta: torch.Tensor  # (n, d): the change of layer L's output at the last subject token
    stats: list[dict] = field(default_factory=list)  # per fact: steps, converged, nll, prob, norm
    contexts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # prefix_s (one-time pass), steps_s


class _Layout:
    """Rows of the optimisation batch: per fact, one row per context plus one KL row."""

    def __init__(self, tokenizer, requests: list[EditRequest], contexts: list[str], device=None):
        rows, subj, fact, bare = [], [], [], []
        lp_row, lp_pos, lp_tgt, kl_row, kl_pos = [], [], [], [], []
        for f, r in enumerate(requests):
            tgt = target_ids(tokenizer, r.target_new)
            for c, ctx in enumerate(contexts):
                ids, s = encode_with_subject(tokenizer, ctx, r.prompt, r.subject)
                if c == 0:
                    bare.append(len(rows))
                for j, t in enumerate(tgt):
                    lp_row.append(len(rows)); lp_pos.append(len(ids) - 1 + j); lp_tgt.append(t)
                rows.append(ids + tgt[:-1]); subj.append(s); fact.append(f)
            ids, s = encode_with_subject(tokenizer, "", KL_TEMPLATE, r.subject)
            kl_row.append(len(rows)); kl_pos.append(len(ids) - 1)
            rows.append(ids); subj.append(s); fact.append(f)
        self.batch = pad_right(rows, subj, pad_id(tokenizer), device=device)
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        self.fact = as_long(fact)  # (B,) fact index of each row
        self.bare = as_long(bare)  # (n,) row of each fact's bare prompt
        self.lp_row, self.lp_pos = as_long(lp_row), as_long(lp_pos)  # (m,)
        self.lp_tgt = as_long(lp_tgt)  # (m,)
        self.kl_row, self.kl_pos = as_long(kl_row), as_long(kl_pos)  # (n,)


def _adam_step(delta, grad, m, v, t, rows, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam on the selected rows of delta only (facts still being optimised)."""
    g = grad[rows]
    m[rows] = b1 * m[rows] + (1 - b1) * g
    v[rows] = b2 * v[rows] + (1 - b2) * g * g
    t[rows] += 1
    tt = t[rows].view(-1, *[1] * (delta.dim() - 1)).to(delta.dtype)
    mhat = m[rows] / (1 - b1 ** tt)
    vhat = v[rows] / (1 - b2 ** tt)
    delta[rows] -= lr * mhat / (vhat.sqrt() + eps)


def optimise_values(model, tokenizer, spec: ModelSpec, requests: list[EditRequest], hp: EditHParams,
                    contexts: list[str], *, pmet: bool = False, progress: Progress | None = None) -> ValueTargets:
    """Target changes δ for every fact. Facts are independent here (own δ, own Adam state, own
    stopping), so a large batch is optimised in chunks of `hp.v_batch` facts: same result,
    memory bounded by the chunk, not the batch. With `hp.v_buckets` > 1 the facts are first
    grouped by the width of what every step recomputes (the tokens from the subject's last one on),
    so a chunk's steps are not padded to the widest fact of the batch: same result again, fewer
    tokens. Results come back in the requests' order. progress("values", facts finished, facts)."""
    order = list(range(len(requests)))
    groups = [order]
    if hp.v_buckets > 1 and len(requests) > 1:
        from .forward import length_buckets
        widths = torch.tensor([suffix_width(tokenizer, r) for r in requests])  # (n,)
        groups = [sorted(g.tolist()) for g in length_buckets(widths, hp.v_buckets)]
    chunks = [g[i:i + hp.v_batch] for g in groups for i in range(0, len(g), hp.v_batch)]
    parts, finished = [], 0
    for chunk in chunks:
        report = None if progress is None else (
            lambda phase, done, total, base=finished: progress(phase, base + done, len(requests)))
        parts.append(_optimise(model, tokenizer, spec, [requests[j] for j in chunk], hp, contexts,
                               pmet=pmet, progress=report))
        finished += len(chunk)
    if len(parts) == 1:
        return parts[0]
    where = torch.tensor([j for c in chunks for j in c])  # (n,) request index of each concatenated row
    back = torch.argsort(where)  # (n,) concatenated row of each request
    delta = torch.cat([p.delta for p in parts])[back.to(parts[0].delta.device)]  # (n, d)
    stats = [s for p in parts for s in p.stats]
    timings = {k: sum(p.timings.get(k, 0.0) for p in parts) for k in ("prefix_s", "steps_s")}
    return ValueTargets(delta=delta, stats=[stats[i] for i in back.tolist()], contexts=list(contexts),
                        timings=timings)


def suffix_width(tokenizer, request: EditRequest) -> int:
    """Columns each v* step recomputes for this fact: from the subject's last token to the end of
    the longest row (the prompt + target rows; the KL row). Context prefixes do not change it."""
    ids, s = encode_with_subject(tokenizer, "", request.prompt, request.subject)
    kl_ids, kl_s = encode_with_subject(tokenizer, "", KL_TEMPLATE, request.subject)
    return max(len(ids) - s + len(target_ids(tokenizer, request.target_new)) - 1, len(kl_ids) - kl_s)


def _prefix_forward(model, spec: ModelSpec, lay: _Layout, L: int, pmet: bool, buckets: int = 1):
    """knowledger's step: once, a full pass caching every layer's keys/values and the input of the
    first block that runs per step; each step then recomputes only the columns from the subject's
    last token on (editors.forward.PrefixCache), in blocks start.. only, and unembeds only the
    positions the loss reads. Returns (step_logits, h_norm (n,))."""
    ids, subj = lay.batch.ids, lay.batch.subject_pos  # (B, T), (B,)
    dev = ids.device
    start = L if pmet else L + 1
    with torch.no_grad():
        prefix = PrefixCache(model, spec, ids, block_inputs=sorted({start, L + 1}),
                             lengths=lay.batch.lengths, max_buckets=buckets)
    h_L = prefix.block_inputs[L + 1]  # (B, T, d) output of block L
    S = int((lay.batch.lengths - subj).max())  # suffix width
    cols = (subj[:, None] + torch.arange(S, device=dev)[None]).clamp(max=ids.shape[1] - 1)  # (B, S)
    h_in = prefix.block_inputs[start].gather(1, cols[..., None].expand(-1, -1, h_L.shape[-1]))  # (B, S, d)
    lp_col = lay.lp_pos - subj[lay.lp_row]  # (m,) loss positions as suffix columns
    kl_col = lay.kl_pos - subj[lay.kl_row]  # (n,)
    h_norm = h_L[lay.bare, subj[lay.bare]].float().norm(dim=-1)  # (n,) ‖h‖ at the bare prompt's subject

    def step_logits(rows, local, per_row, lsel, ksel):
        onehot = torch.zeros(rows.numel(), S, 1, dtype=h_in.dtype, device=dev)  # (b, S, 1): δ at column 0
        onehot[:, 0] = 1.0
        position_ids, key_mask = prefix.suffix_inputs(subj[rows], S)  # (b, S), (b, T+S)
        run = dict(position_ids=position_ids, cache=prefix.select(rows), attention_mask=key_mask)
        if pmet:
            final = run_with_component_deltas(model, spec, L, h_in[rows], onehot, per_row, run)
        else:
            add = (onehot * per_row[:, 0].unsqueeze(1)).to(h_in.dtype)  # (b, S, d) in the model's dtype
            final = run_from(model, spec, start, h_in[rows] + add, **run)  # (b, S, d)
        x = final[local[lay.lp_row[lsel]], lp_col[lsel]]  # (m, d)
        xk = final[local[lay.kl_row[ksel]], kl_col[ksel]]  # (a, d)
        return unembed(model, x), unembed(model, xk)  # (m, V), (a, V)

    return step_logits, h_norm


def _full_forward(model, spec: ModelSpec, lay: _Layout, L: int, pmet: bool):
    """The reference implementation's step (hparams v_prefix_cache=False): every step runs the whole
    model from the embeddings over every row and column, δ added by a hook at the last subject
    token of layer L's output (PMET: of its attention and MLP outputs), full-vocabulary logits at
    every position and their log-softmax, then the loss positions are read. Same loss as
    _prefix_forward up to rounding; only slower. Returns (step_logits, h_norm (n,))."""
    ids, subj = lay.batch.ids, lay.batch.subject_pos  # (B, T), (B,)
    T = ids.shape[1]
    with torch.no_grad():
        h_L = capture(model, spec, ids, block_outputs=[L])[f"out:{L}"]  # (B, T, d)
    h_norm = h_L[lay.bare, subj[lay.bare]].float().norm(dim=-1)  # (n,)
    del h_L
    names = [spec.attn_name(L), spec.mlp_name(L)] if pmet else [spec.layer(L)]

    def step_logits(rows, local, per_row, lsel, ksel):
        onehot = torch.zeros(rows.numel(), T, 1, device=ids.device)  # (b, T, 1): 1 at the subject
        onehot[torch.arange(rows.numel(), device=ids.device), subj[rows]] = 1.0
        adds = {name: onehot * per_row[:, j].unsqueeze(1) for j, name in enumerate(names)}  # (b, T, d)

        def edit(output, name):
            return output + adds[name].to(output.dtype)

        with TraceDict(model, names, retain_output=False, edit_output=edit):
            out = model(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), use_cache=False)
        logp = F.log_softmax(out.logits.float(), dim=-1)  # (b, T, V), as the reference computes it
        return (logp[local[lay.lp_row[lsel]], lay.lp_pos[lsel]],  # (m, V)
                logp[local[lay.kl_row[ksel]], lay.kl_pos[ksel]])  # (a, V)

    return step_logits, h_norm


def _optimise(model, tokenizer, spec: ModelSpec, requests: list[EditRequest], hp: EditHParams,
              contexts: list[str], *, pmet: bool = False, progress: Progress | None = None) -> ValueTargets:
    L = hp.v_layer
    dev = model_device(model)  # every tensor below lives here; δ and Adam's state stay float32
    lay = _Layout(tokenizer, requests, contexts, device=dev)
    n, B = len(requests), lay.batch.ids.shape[0]
    k = 2 if pmet else 1  # PMET: (attention part, MLP part)
    t0 = time.perf_counter()
    if hp.v_prefix_cache:
        step_logits, h_norm = _prefix_forward(model, spec, lay, L, pmet, hp.v_prefix_buckets)
    else:  # the reference implementation's way, kept for measuring against it (bench/speed.py)
        step_logits, h_norm = _full_forward(model, spec, lay, L, pmet)
    d = model.get_input_embeddings().weight.shape[-1]  # the residual stream's width
    delta = torch.zeros(n, k, d, device=dev)  # (n, k, d) float32 whatever the model's dtype
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)  # (n, k, d) Adam's moments
    t = torch.zeros(n, dtype=torch.long, device=dev)  # (n,) Adam's step per fact
    max_norm = hp.v_clamp_norm_factor * h_norm  # (n,)
    streak = torch.zeros(n, dtype=torch.long, device=dev)  # (n,)
    done = torch.zeros(n, dtype=torch.bool, device=dev)  # (n,)
    steps = torch.zeros(n, dtype=torch.long, device=dev)  # (n,)
    below = torch.full((n,), -1, dtype=torch.long, device=dev)  # (n,) steps when loss first < early_stop_loss
    last_nll = torch.full((n,), float("nan"), device=dev)  # (n,)
    last_prob = torch.full((n,), float("nan"), device=dev)  # (n,)
    kl0 = None
    t1 = time.perf_counter()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if hp.autocast_bf16 else nullcontext()
    for step in range(hp.v_steps + 1):
        active_f = (~done).nonzero().flatten()  # (a,)
        if active_f.numel() == 0:
            break
        rows = torch.isin(lay.fact, active_f).nonzero().flatten()  # (b,)
        local = torch.full((B,), -1, dtype=torch.long, device=dev)  # (B,) row -> position among active
        local[rows] = torch.arange(rows.numel(), device=dev)
        dvar = delta.clone().requires_grad_(True)
        per_row = dvar[lay.fact[rows]]  # (b, k, d)
        lsel = torch.isin(lay.lp_row, rows)  # target positions of active rows
        ksel = torch.isin(lay.kl_row, rows)
        with autocast:
            logits, logits_kl = step_logits(rows, local, per_row, lsel, ksel)  # (m, V), (a, V)
            logp = F.log_softmax(logits.float(), dim=-1)  # (m, V)
            logp_kl = F.log_softmax(logits_kl.float(), dim=-1)  # (a, V)
        tgt = lay.lp_tgt[lsel]
        fact_of_lp = lay.fact[lay.lp_row[lsel]]  # (m,)
        nll_pos = -logp.gather(1, tgt[:, None]).squeeze(1)  # (m,)
        zeros_n = torch.zeros(n, device=dev)  # (n,) float32
        cnt = zeros_n.index_add(0, fact_of_lp, torch.ones_like(nll_pos))  # (n,) target tokens per fact
        nll = zeros_n.index_add(0, fact_of_lp, nll_pos) / cnt.clamp(min=1)  # (n,)
        hit = (logp.argmax(-1) == tgt).float()
        all_hit = zeros_n.index_add(0, fact_of_lp, hit) == cnt  # (n,)
        if kl0 is None:  # step 0 runs with δ = 0: the unedited distribution
            kl0 = torch.zeros(n, logp_kl.shape[-1], device=dev)  # (n, V)
            kl0[active_f] = logp_kl.detach()
        kl = zeros_n.index_put((active_f,), F.kl_div(logp_kl, kl0[active_f], log_target=True,
                                                 reduction="none").sum(-1))
        wd = hp.v_weight_decay * dvar.pow(2).sum((1, 2)) / h_norm.pow(2)  # (n,)
        loss = nll + hp.kl_factor * kl + wd  # (n,)

        with torch.no_grad():
            newly = active_f[(below[active_f] < 0) & (loss[active_f].detach() < hp.early_stop_loss)]
            below[newly] = steps[newly]
            last_nll[active_f] = nll[active_f].detach()
            last_prob[active_f] = torch.exp(-nll[active_f].detach())
            streak[active_f] = torch.where(all_hit[active_f], streak[active_f] + 1, 0)
            if hp.early_stop:
                fin = active_f[(streak[active_f] >= hp.early_stop_patience)
                               | (nll[active_f].detach() < hp.early_stop_loss)]
                done[fin] = True
            if step == hp.v_steps:
                break
        upd = (~done).nonzero().flatten()
        if upd.numel() == 0:
            break
        (grad,) = torch.autograd.grad(loss[upd].sum(), dvar)  # only δ: weights get no .grad
        with torch.no_grad():
            _adam_step(delta, grad, m, v, t, upd, hp.v_lr)
            steps[upd] += 1
            norms = delta.norm(dim=-1)  # (n, k)
            scale = torch.clamp(max_norm[:, None] / norms.clamp(min=1e-12), max=1.0)
            delta *= scale.unsqueeze(-1)
        if progress is not None:
            progress("values", int(done.sum()), n)

    stats = [
        {"steps": int(steps[f]), "converged": bool(streak[f] >= hp.early_stop_patience),
         "nll": float(last_nll[f]), "prob": float(last_prob[f]),
         "steps_to_loss": int(below[f]) if below[f] >= 0 else None,
         "delta_norm": float(delta[f, -1].norm()), "h_norm": float(h_norm[f])}
        for f in range(n)
    ]
    # The MLP part (the only part for MEMIT/EMMET) is the target change of layer L's output.
    timings = {"prefix_s": t1 - t0, "steps_s": time.perf_counter() - t1}
    return ValueTargets(delta=delta[:, -1].clone(), stats=stats, contexts=list(contexts), timings=timings)
