"""Text corpora for key statistics: a file on disk (plain text or JSONL), or text the model samples.

A corpus is identified by the sha256 of its file's bytes; that hash goes into every statistics
cache key. `Corpus.chunks` turns it into token sequences of at most `seq_len` tokens (documents are
never joined; a long document is cut into several sequences) totalling exactly `n_tokens` when the
corpus has that many.

Formats
- plain text (e.g. WikiText raw): documents are blocks separated by blank lines; heading lines
  (WikiText's `= = Title = =`, Markdown's `# Title`) are dropped and WikiText's ` @-@ ` style
  markers are undone.
- JSONL (`.jsonl` / `.ndjson`): one JSON object a line, its "text" field a document.

With no corpus at hand, `Corpus.sampled` lets the model write one: sampling at temperature 1 from a
few short neutral prompts with a fixed seed, batched with left padding and the full attention mask
(a one-column mask silently produced garbage in the reference implementation). The text is cached
once under `$KNOWLEDGER_CACHE/corpora/<weights sha256 prefix>-<n_tokens>-<seed>.txt`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .models import cache_root, file_sha256, weights_sha256

log = logging.getLogger(__name__)

_HEADING = re.compile(r"^\s*(=\s*)+[^=].*?(\s*=)+\s*$|^\s*#{1,6}\s")
_WIKITEXT_MARKERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SEED_PROMPTS = ("The", "In", "It is", "A", "This", "When", "There are", "One of the",
                 "Many", "According to", "After", "He", "She", "We", "Some", "Today")
_TOKENIZE_BATCH = 64  # documents tokenised per call


@dataclass(frozen=True)
class Corpus:
    path: Path
    sha256: str  # of the file's bytes
    format: str  # "text" or "jsonl"

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "Corpus":
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"
        return cls(path=path, sha256=file_sha256(path), format=fmt)

    # --- documents and token sequences ---------------------------------------------------------
    def documents(self) -> Iterator[str]:
        """The corpus's documents in file order, empty ones and headings skipped."""
        with open(self.path, encoding="utf-8", errors="replace") as f:
            if self.format == "jsonl":
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line).get("text", "")
                    except (json.JSONDecodeError, AttributeError) as e:
                        raise ValueError(
                            f"{self.path}:{i}: not a JSON object with a 'text' field") from e
                    if isinstance(text, str) and text.strip():
                        yield text.strip()
                return
            block: list[str] = []
            for line in f:
                if line.strip():
                    if not _HEADING.match(line):
                        block.append(_clean(line.strip()))
                    continue
                if block:
                    yield "\n".join(block)
                    block = []
            if block:
                yield "\n".join(block)

    def chunks(self, tokenizer, n_tokens: int, seq_len: int = 128, min_len: int = 8) -> list[list[int]]:
        """Token sequences of ≤ seq_len tokens, in corpus order, totalling min(n_tokens, available).

        A BOS token starts every sequence when the tokenizer adds one by itself. Pieces shorter
        than min_len (one-word lines, a document's short tail) are skipped; the last sequence is
        cut so that the total is exactly n_tokens.
        """
        if n_tokens < 1 or seq_len < 2:
            raise ValueError(f"need n_tokens >= 1 and seq_len >= 2, got {n_tokens}, {seq_len}")
        bos = _bos_prefix(tokenizer)
        body = seq_len - len(bos)
        out: list[list[int]] = []
        total = 0
        docs = self.documents()
        while total < n_tokens:
            batch = [d for _, d in zip(range(_TOKENIZE_BATCH), docs)]
            if not batch:
                break
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                for start in range(0, len(ids), body):
                    piece = bos + ids[start:start + body]
                    if len(piece) - len(bos) < min_len:
                        continue
                    piece = piece[: n_tokens - total]
                    out.append(piece)
                    total += len(piece)
                    if total >= n_tokens:
                        return out
        if total < n_tokens:
            log.warning("corpus %s has only %d tokens in usable pieces (asked for %d)",
                        self.path.name, total, n_tokens)
        return out

    # --- a corpus the model writes ---------------------------------------------------------------
    @classmethod
    def sampled(cls, model, tokenizer, n_tokens: int, seed: int = 0, *, weights_sha: str | None = None,
                cache_dir: str | os.PathLike | None = None, batch_size: int = 128,
                max_new_tokens: int = 128, progress: bool = True) -> "Corpus":
        """Text sampled from the model itself (≈ n_tokens tokens, a 10% margin), made once and cached.

        Slow on CPU (token-by-token generation, full-vocabulary logits each step): about 160
        tokens/s for the default model here, so 100k tokens take ~10 minutes, once. A real corpus
        file (WikiText) is the better choice.
        """
        sha = weights_sha or weights_sha256(model)
        folder = Path(cache_dir) if cache_dir is not None else cache_root() / "corpora"
        path = folder / f"{sha[:16]}-{n_tokens}-{seed}.txt"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            docs = _sample_documents(model, tokenizer, int(n_tokens * 1.1) + 1, seed, batch_size,
                                     max_new_tokens, progress)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write("\n\n".join(docs) + "\n")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return cls.from_path(path)


def _clean(line: str) -> str:
    for marker, char in _WIKITEXT_MARKERS:
        line = line.replace(marker, char)
    return line


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer puts one in front of text by itself, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _sample_documents(model, tokenizer, n_tokens: int, seed: int, batch_size: int,
                      max_new_tokens: int, progress: bool) -> list[str]:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    bos = _bos_prefix(tokenizer)
    docs: list[str] = []
    total, step = 0, 0
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.inference_mode(), \
            tqdm(total=n_tokens, unit="tok", desc="sampling a corpus", disable=not progress) as bar:
        torch.manual_seed(seed)
        while total < n_tokens:
            prompts = [_SEED_PROMPTS[(step + j) % len(_SEED_PROMPTS)] for j in range(batch_size)]
            step += batch_size
            encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            width = max(map(len, encoded))
            ids = torch.full((batch_size, width), pad, dtype=torch.long)  # (b, t), left padded
            mask = torch.zeros((batch_size, width), dtype=torch.long)  # (b, t), the full mask
            for row, e in enumerate(encoded):
                ids[row, width - len(e):] = torch.tensor(e)
                mask[row, width - len(e):] = 1
            limit = getattr(model.config, "max_position_embeddings", None) or width + max_new_tokens
            needed = -(-(n_tokens - total) // batch_size)  # per sequence, rounded up
            config.max_new_tokens = max(1, min(max_new_tokens, limit - width, max(needed, 8)))
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)
            for prompt, seq, row in zip(prompts, encoded, out[:, width:].tolist()):
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                docs.append((prompt + tokenizer.decode(row, skip_special_tokens=True)).strip())
                n = len(seq) + len(row)  # counted as generated: always progresses
                total += n
                bar.update(n)
    return docs
