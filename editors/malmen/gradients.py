"""MALMEN's LM side (Tan, Zhang & Fu, ICLR 2024, Figure 2 steps i-ii): per edited layer, the keys u_j
(d_in,) and the value gradients g_j = ∂L_edit/∂v_j (d_out,) at every edit token, from one forward
and one backward pass over prompt + target_new, in chunks of any size."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..forward import unembed
from ..hooks import TraceDict
from ..model_spec import ModelSpec
from ..progress import Progress, report
from ..requests import EditRequest
from ..tokens import TeacherForced, teacher_forced


def edit_loss(model, tf: TeacherForced, hidden: torch.Tensor) -> torch.Tensor:
    """Σ over items of the mean NLL of their target tokens (one item's gradient does not depend on
    the others in its batch)  # hidden (B, T, d) -> ()"""
    logp = F.log_softmax(unembed(model, hidden[tf.rows, tf.cols]).float(), -1)  # (m, V)
    nll = -logp.gather(1, tf.targets[:, None]).squeeze(1)  # (m,)
    return tf.per_item_mean(nll).sum()


@dataclass
class TokenCache:
    """Per edited layer, the edit tokens' keys u (n, d_in) and output gradients g (n, d_out);
    `first` (n_facts,) indexes each fact's first target token (its last prompt token)."""

    u: dict[int, torch.Tensor] = field(default_factory=dict)
    g: dict[int, torch.Tensor] = field(default_factory=dict)
    first: torch.Tensor | None = None
    loss: float = 0.0  # Σ over facts of the mean target NLL before editing
    v_norm: dict[int, float] = field(default_factory=dict)  # median ‖v‖ at the edit tokens

    @property
    def n_tokens(self) -> int:
        return len(next(iter(self.u.values()))) if self.u else 0


def final_hidden(model, spec: ModelSpec, tf: TeacherForced) -> torch.Tensor:
    """The final-normed hidden states of a teacher-forced batch  # -> (B, T, d)"""
    ids = tf.batch.ids
    base = model.get_submodule(spec.base)
    return base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state


def cache_tokens(model, spec: ModelSpec, layers, tf: TeacherForced, *,
                 run: Callable | None = None) -> TokenCache:
    """One forward and one backward pass of the edit loss: u and ∂L/∂v at every edit token.

    ∂L/∂v is read as the gradient of a zero tensor added to each layer's output, so nothing of the
    model needs requires_grad and the gradient includes every path above the layer.
    run(tf) -> final hidden states (B, T, d): how to run the LM (default `final_hidden`; meta-
    training passes one that starts from cached inputs of the first edited block)."""
    names = [spec.mlp_out_name(l) for l in layers]
    zeros: dict[str, torch.Tensor] = {}

    def add_zero(out, name):
        zeros[name] = torch.zeros_like(out, requires_grad=True)
        return out + zeros[name]

    run = run or (lambda t: final_hidden(model, spec, t))
    with torch.enable_grad(), TraceDict(model, names, retain_input=True, retain_output=True,
                                        edit_output=add_zero) as td:
        hidden = run(tf)
        loss = edit_loss(model, tf, hidden)
        grads = torch.autograd.grad(loss, [zeros[n] for n in names])
    cache = TokenCache(first=tf.first(), loss=float(loss.detach()))
    for l, name, grad in zip(layers, names, grads):
        cache.u[l] = td[name].input[tf.rows, tf.cols].float()  # (n, d_in)
        cache.g[l] = grad[tf.rows, tf.cols].float()  # (n, d_out)
        cache.v_norm[l] = float(td[name].output[tf.rows, tf.cols].norm(dim=-1).median())
    return cache


def rewrite_chunks(tokenizer, requests: list[EditRequest], lm_batch: int):
    """(facts, their rewrite prompt + target_new as a TeacherForced batch), lm_batch facts at a time."""
    for s in range(0, len(requests), lm_batch):
        chunk = requests[s : s + lm_batch]
        yield chunk, teacher_forced(tokenizer, [(r.text, r.target_new) for r in chunk])


def cache_requests(model, tokenizer, spec: ModelSpec, layers, requests: list[EditRequest],
                   lm_batch: int, progress: Progress | None = None, run: Callable | None = None) -> TokenCache:
    """cache_tokens over the rewrite prompts, lm_batch facts per pass, concatenated.
    progress("gradients", facts done, facts)."""
    parts, done = [], 0
    for chunk, tf in rewrite_chunks(tokenizer, requests, lm_batch):
        parts.append(cache_tokens(model, spec, layers, tf, run=run))
        done += len(chunk)
        report(progress, "gradients", done, len(requests))
    out = TokenCache(loss=sum(p.loss for p in parts),
                     v_norm={l: sorted(p.v_norm[l] for p in parts)[len(parts) // 2] for l in layers})
    offset, firsts = 0, []
    for p in parts:
        firsts.append(p.first + offset)
        offset += p.n_tokens
    out.first = torch.cat(firsts)
    for l in layers:
        out.u[l] = torch.cat([p.u[l] for p in parts])
        out.g[l] = torch.cat([p.g[l] for p in parts])
    return out
