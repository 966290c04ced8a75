"""Token bookkeeping for edits: subject positions, target ids, right-padded batches.

Batches are right-padded and run without an attention mask: with causal attention, real tokens
never attend to the padding that follows them, and every position an editor reads (last subject
token, target positions) is a real token. Position ids are then simply 0..T-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a continuation, with a leading space as the next word would have."""
    text = target if target.startswith(" ") else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


def encode_with_subject(tokenizer, prefix: str, template: str, subject: str) -> tuple[list[int], int]:
    """Tokenise `prefix + template.format(subject)`; return (ids, index of the last subject token)."""
    head, _, _ = template.partition("{}")
    text = prefix + template.format(subject)
    subj_end = len(prefix) + len(head) + len(subject)  # char offset just past the subject
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    last = None
    for i, (a, b) in enumerate(offsets):
        if a < subj_end and b > a:
            last = i  # the last token that starts before the subject ends
    if last is None:
        raise ValueError(f"subject {subject!r} not found in tokens of {text!r}")
    return list(ids), last


@dataclass
class Batch:
    """A right-padded batch. ids (B, T); rows' lengths; the subject position per row."""

    ids: torch.Tensor  # (B, T) long
    lengths: torch.Tensor  # (B,) long
    subject_pos: torch.Tensor  # (B,) long


def pad_right(rows: list[list[int]], subject_pos: list[int], pad_id: int, *, device=None) -> Batch:
    """rows of token ids -> one right-padded batch on `device` (default: CPU)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T), built on the CPU ...
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Batch(ids=ids.to(device), lengths=as_long([len(r) for r in rows]),  # ... moved once
                 subject_pos=as_long(subject_pos))


@dataclass
class TeacherForced:
    """(prompt, target) items as one right-padded batch, and where each target token is read.

    Target token k of item i is predicted at column len(prompt_i) − 1 + k of row i.
    """

    batch: Batch
    rows: torch.Tensor  # (m,) long: row of each target token
    cols: torch.Tensor  # (m,) long: the column whose output predicts it
    targets: torch.Tensor  # (m,) long: the target token ids
    owner: torch.Tensor  # (m,) long: the item each target token belongs to
    n_items: int

    def per_item_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of a per-target-token quantity x  # (m,) -> (n_items,)"""
        total = torch.zeros(self.n_items, dtype=x.dtype, device=x.device).index_add(0, self.owner.to(x.device), x)
        count = torch.bincount(self.owner, minlength=self.n_items).to(x.device, x.dtype)
        return total / count

    def first(self) -> torch.Tensor:
        """Index (into the m target tokens) of each item's first target token  # (n_items,)"""
        first = torch.full((self.n_items,), len(self.owner), dtype=torch.long)
        return first.scatter_reduce(0, self.owner, torch.arange(len(self.owner)), "amin")


def teacher_forced(tokenizer, items: list[tuple[str, str]]) -> TeacherForced:
    """Tokenise (prompt, target) items: prompt with the tokenizer's special tokens, the target as
    a continuation (target_ids); rows are prompt + target without its last token."""
    rows, r, c, tgt, owner = [], [], [], [], []
    for j, (prompt, target) in enumerate(items):
        p_ids = tokenizer(prompt)["input_ids"]
        t_ids = target_ids(tokenizer, target)
        for k, t in enumerate(t_ids):
            r.append(j); c.append(len(p_ids) - 1 + k); tgt.append(t); owner.append(j)
        rows.append(list(p_ids) + t_ids[:-1])
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return TeacherForced(pad_right(rows, [0] * len(rows), pad_id(tokenizer)), as_long(r), as_long(c),
                         as_long(tgt), as_long(owner), len(items))


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0
