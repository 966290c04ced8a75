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
(a one-column mask silently produced garbage in the reference implementation), with a KV cache and
the LM head on the last position only. The text is cached once under
`$KNOWLEDGER_CACHE/corpora/<weights sha256 prefix>-<n_tokens>-<seed>.txt`, its key and the sha256 of
its text in its first line (checked on every use). Progress goes to a `Progress` callback
("sample", tokens done, tokens wanted) and to INFO log lines at the start and the end.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .fileio import atomic_write_text, sha256_bytes
from .hparams import cpu_flags
from .models import cache_root, file_sha256, weights_sha256
from .progress import Progress, report

log = logging.getLogger(__name__)

_HEADING = re.compile(r"^\s*(=\s*)+[^=].*?(\s*=)+\s*$|^\s*#{1,6}\s")
_WIKITEXT_MARKERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SEED_PROMPTS = ("The", "In", "It is", "A", "This", "When", "There are", "One of the",
                 "Many", "According to", "After", "He", "She", "We", "Some", "Today")
_TOKENIZE_BATCH = 64  # documents tokenised per call
SAMPLE_ROWS = 256  # rows sampled at once (Corpus.sampled)


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
                cache_dir: str | os.PathLike | None = None, batch_size: int = SAMPLE_ROWS,
                max_new_tokens: int = 64, progress: Progress | bool | None = None,
                autocast_bf16: bool | None = None, observe: Observe | None = None) -> "Corpus":
        """Text sampled from the model itself (n_tokens tokens, counted as the model's), made once
        and cached.

        Batched generation with a KV cache, the LM head on the last position only, end-of-text
        suppressed so that every row stays useful to the end (documents are `max_new_tokens` long:
        short contexts, like the edit prompts'); under bf16 autocast where the hardware has bf16
        matrix units (`has_bf16_units`; `autocast_bf16` overrides). Rows per batch: 256, so the
        default model's 12,288 tokens are one batch of 202 rows × 64 steps; wider matrix products
        are cheaper per token on a CPU (measured on this AVX2 host: 128–139 tokens per CPU-second
        at 256 rows against 88–112 at 64; docs/benchmarks.md, "The first run"), and the KV cache
        stays under 0.8 GB (256 rows × 66 positions × 30 layers at most).

        The file starts with a heading line holding its key (weights, n_tokens, seed, sampler
        settings) and the sha256 of the text below it; `documents()` drops that line. A file whose
        key or text does not match is sampled again, with a logged note.

        observe: called as `observe(real)` around every forward pass of the sampler, `real` the
            (rows, input columns) bool mask of the real (not padding) input positions; it returns a
            context manager entered around that forward (editors.stats collects the edited layers'
            keys this way, so no second pass over the text is needed). Not called when the corpus
            comes from the cache.
        """
        progress = None if isinstance(progress, bool) else progress  # older callers pass a bool
        path, key, bf16 = _sampled_location(model, n_tokens, seed, weights_sha, cache_dir, batch_size,
                                            max_new_tokens, autocast_bf16)
        if not _sampled_cache_ok(path, key):
            start = time.perf_counter()
            log.info("sampling %s tokens of statistics text from the model ...", f"{n_tokens:,}")
            docs = _sample_documents(model, tokenizer, int(n_tokens * _MARGIN) + 1, seed, batch_size,
                                     max_new_tokens, progress, bf16, observe)
            body = "\n\n".join(docs) + "\n"
            header = _SAMPLED_HEADER + json.dumps(dict(key=key, text_sha256=sha256_bytes(body.encode())),
                                                  sort_keys=True, separators=(",", ":"))
            atomic_write_text(path, header + "\n\n" + body)
            seconds = time.perf_counter() - start
            log.info("sampling %s tokens ... done in %.1f s (%.0f tokens/s)", f"{n_tokens:,}", seconds,
                     n_tokens / max(seconds, 1e-9))
        return cls.from_path(path)

    @classmethod
    def sampled_cached(cls, model, n_tokens: int, seed: int = 0, *, weights_sha: str | None = None,
                       cache_dir: str | os.PathLike | None = None, batch_size: int = SAMPLE_ROWS,
                       max_new_tokens: int = 64, autocast_bf16: bool | None = None) -> "Corpus | None":
        """The corpus `sampled` would return with these arguments when it is in the cache and
        intact, else None (nothing is sampled)."""
        path, key, _ = _sampled_location(model, n_tokens, seed, weights_sha, cache_dir, batch_size,
                                         max_new_tokens, autocast_bf16)
        return cls.from_path(path) if _sampled_cache_ok(path, key, quiet=True) else None


Observe = Callable[[torch.Tensor], AbstractContextManager]

_SAMPLED_KIND = "knowledger.sampled_corpus"
_SAMPLED_VERSION = 3  # 2: KV-cache sampler, end-of-text suppressed, key in the file; 3: inverse-CDF draw
_SAMPLED_HEADER = "# knowledger sampled corpus "
_MARGIN = 1.05  # re-tokenising sampled text gives a few tokens fewer than were sampled


def _sampled_location(model, n_tokens, seed, weights_sha, cache_dir, batch_size, max_new_tokens,
                      autocast_bf16) -> tuple[Path, dict, bool]:
    """(cache path, key, bf16 autocast?) of a sampled corpus."""
    sha = weights_sha or weights_sha256(model)
    bf16 = has_bf16_units(next(model.parameters()).device) if autocast_bf16 is None else autocast_bf16
    key = dict(kind=_SAMPLED_KIND, version=_SAMPLED_VERSION, weights_sha256=sha, n_tokens=int(n_tokens),
               seed=int(seed), batch_size=int(batch_size), max_new_tokens=int(max_new_tokens),
               forward="bfloat16-autocast" if bf16 else "model-dtype")
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "corpora"
    return folder / f"{sha[:16]}-{n_tokens}-{seed}.txt", key, bf16


def _sampled_cache_ok(path: Path, key: dict, quiet: bool = False) -> bool:
    """True when `path` holds a sampled corpus with exactly `key` and an intact text (quiet: no
    log note when it does not; the caller samples it and `sampled` notes why)."""
    if not path.is_file():
        return False
    warn = (lambda *args: None) if quiet else log.warning
    try:
        data = path.read_bytes()
        head, _, body = data.partition(b"\n\n")
        text = head.decode("utf-8")
        if not text.startswith(_SAMPLED_HEADER):
            raise ValueError("no key line")
        meta = json.loads(text[len(_SAMPLED_HEADER):])
    except (OSError, ValueError) as e:
        warn("sampled corpus %s is unreadable (%s): sampling it again", path, e)
        return False
    if meta.get("key") != key:
        warn("sampled corpus %s was made with other settings: sampling it again", path)
        return False
    if meta.get("text_sha256") != sha256_bytes(body):
        warn("sampled corpus %s is corrupt (its text does not match its sha256): sampling "
                    "it again", path)
        return False
    return True


def has_bf16_units(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix products are fast here: a CUDA GPU with bf16, or a CPU with AMX or
    AVX512-BF16 (on a CPU without them bf16 autocast is no faster than float32, REFERENCE.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


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
                      max_new_tokens: int, progress: Progress | None, bf16: bool,
                      observe: Observe | None = None) -> list[str]:
    """Documents of one seed prompt plus up to max_new_tokens sampled tokens, n_tokens in all."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    banned = sorted({t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None})
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    bos = _bos_prefix(tokenizer)
    docs: list[str] = []
    total, step = 0, 0
    report(progress, "sample", 0, n_tokens)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        gen = torch.Generator(device=device).manual_seed(seed)
        while total < n_tokens:
            rows = min(batch_size, -(-(n_tokens - total) // max(1, max_new_tokens)))
            prompts = [_SEED_PROMPTS[(step + j) % len(_SEED_PROMPTS)] for j in range(rows)]
            step += rows
            encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            width = max(map(len, encoded))
            new = max(1, min(max_new_tokens, limit - width))
            before, prompt_tokens = total, sum(map(len, encoded))

            def stepped(s, before=before, rows=rows, prompt_tokens=prompt_tokens):  # s steps done
                report(progress, "sample", min(before + prompt_tokens + rows * s, n_tokens - 1), n_tokens)

            out = _generate(model, encoded, width, new, pad, banned, gen, device, observe,
                            stepped if progress is not None else None)  # (rows, new)
            for prompt, seq, row in zip(prompts, encoded, out.tolist()):
                room = n_tokens - total - len(seq)
                row = row[: max(0, room)]
                docs.append((prompt + tokenizer.decode(row, skip_special_tokens=True)).strip())
                total += len(seq) + len(row)  # prompt tokens count too: always progresses
                if total >= n_tokens:
                    break
            report(progress, "sample", min(total, n_tokens), n_tokens)
    return docs


def _generate(model, encoded: list[list[int]], width: int, new: int, pad: int, banned: list[int],
              gen: torch.Generator, device, observe: Observe | None = None,
              stepped: Callable[[int], None] | None = None) -> torch.Tensor:
    """Sample `new` tokens for each left-padded row with a KV cache; logits at the last position
    only. The last sampled token is never fed back, so the forward passes see each row's prompt
    and its first new - 1 sampled tokens. stepped(s) after each step s = 1..new (progress: one
    batch may be the whole sample). returns (rows, new) token ids"""
    rows = len(encoded)
    ids = torch.full((rows, width), pad, dtype=torch.long)  # (b, t), left padded
    mask = torch.zeros((rows, width + new), dtype=torch.long)  # (b, t + new): the full mask
    for r, e in enumerate(encoded):
        ids[r, width - len(e):] = torch.tensor(e)
        mask[r, width - len(e):] = 1
    mask[:, width:] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask[:, :width].cumsum(1) - 1).clamp(min=0)  # (b, t)
    kw = _forward_kwargs(model)
    cache, static = _kv_cache(model, width + new)
    out = torch.empty((rows, new), dtype=torch.long, device=device)  # (b, new)
    for s in range(new):
        upto = width + s
        real = mask[:, upto - ids.shape[1]:upto].bool()  # (b, t_in): the input's real positions
        at = dict(attention_mask=mask, cache_position=torch.arange(upto - ids.shape[1], upto, device=device)) \
            if static else dict(attention_mask=mask[:, :upto])
        with observe(real) if observe is not None else nullcontext():
            logits = model(input_ids=ids, position_ids=pos, use_cache=True, **at,
                           **kw(cache, first=s == 0)).logits[:, -1].float()  # (b, V)
        if banned:
            logits[:, banned] = float("-inf")  # end-of-text never ends a row early
        ids = _draw(logits, gen)  # (b, 1)
        out[:, s] = ids[:, 0]
        pos = pos[:, -1:] + 1  # (b, 1)
        if stepped is not None:
            stepped(s + 1)
    return out


def _kv_cache(model, length: int):
    """(cache, static?): a preallocated StaticCache of `length` positions where the model's class
    declares it can run one (`_can_compile_fullgraph`: Llama, Qwen2, Mistral, GPT-2, GPT-J,
    GPT-NeoX in transformers 5), else a DynamicCache. A DynamicCache concatenates every layer's keys
    and values at every step (~10% of the default model's sampling time, measured); the static one
    writes in place, and its forward then takes the full attention mask and `cache_position`."""
    from transformers import DynamicCache, StaticCache

    if getattr(model, "_can_compile_fullgraph", False):
        try:
            return StaticCache(config=model.config, max_cache_len=length), True
        except (TypeError, ValueError):  # a config the static cache cannot size: the dynamic one
            pass
    return DynamicCache(), False


def _draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits), by the inverse CDF: one uniform per row.

    The same distribution as `torch.multinomial(softmax(logits), 1)`, which on the CPU draws an
    exponential variate for every vocabulary entry (49,152 per row: a quarter of the sampler's
    time on SmolLM2, measured); a token of probability 0 (-inf logit) is never drawn, because the
    cumulative sum is flat there and the search takes the first entry strictly above u. In
    float32 (float64's exp costs 6x here): the rounding moves ~1e-5 of probability mass at most.
    logits: (b, V) float32; returns (b, 1) int64
    """
    cdf = torch.softmax(logits, -1).cumsum(-1)  # (b, V)
    u = torch.rand((logits.shape[0], 1), generator=gen, dtype=cdf.dtype, device=logits.device)  # (b, 1)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (b, 1)
    return ids.clamp_(max=logits.shape[-1] - 1)


def _forward_kwargs(model) -> Callable[..., dict]:
    """The forward's keyword names, by its signature (models accept unknown keywords through
    **kwargs and ignore them, so a wrong name would fail silently, not raise): the KV cache is
    `cache` from transformers 5 and `past_key_values` before; last-position logits are
    `logits_to_keep` (4.50+) or `num_logits_to_keep` (4.45-4.49), else all positions are computed.

    Except on the first step (first=True, the prompt): there the last position of a (b, t, d)
    hidden state is a strided view, and the head's product with it went through a batched matmul
    against the vocabulary matrix expanded per row (2.7 s for 252 rows, against 0.27 s for a
    decoding step, measured); the logits of every prompt position (t is a few tokens) cost less."""
    import inspect

    from .forward import cache_kwarg

    params = inspect.signature(model.forward).parameters
    name = cache_kwarg(model)
    keep = next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {})
    return lambda cache, first=False: {name: cache, **({} if first else keep)}
