"""Model-generated context prefixes for the v* optimisation, and their keyed cache on disk.

MEMIT optimises each target value over the bare prompt and a few short prefixes the model itself
wrote ("<text>. "), so that the edit holds in context. Generation costs seconds on a CPU, so the
prefixes are cached under $KNOWLEDGER_CACHE/contexts/<sha256 of the key>.json.

The key is the full provenance of the text (STYLE habit 8): format version, model weights sha256,
tokenizer (class, size, pad id, sha256 of its files or vocabulary), n_context, context_tokens,
context_seed, the seed words and the sampling settings. The file stores the key and the sha256 of
the prefixes; on reading, a file that is not valid JSON, not an object, of another key, or whose
prefixes do not hash to the stored sha256 is not used: the prefixes are generated again and the
file rewritten, with a logged note naming it. An unreadable cache (permissions, a folder in the
way) is named in a note and never blocks an edit; the cache is written atomically and never
through a symlink (editors.fileio).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from .fileio import atomic_write_text, check_inside, sha256_bytes
from .hparams import EditHParams
from .tokens import pad_id

log = logging.getLogger(__name__)

FORMAT = "knowledger-contexts/1"
CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You", "It", "In", "When")
TOP_K = 5  # sampling: top-k with the seed below, so the prefixes are reproducible


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def tokenizer_identity(tokenizer) -> dict:
    """What identifies a tokenizer for the cache: class, size, pad id and the sha256 of its files
    (a few ms), or of its sorted vocabulary when it was not loaded from a folder (~0.3 s at 49k)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()] if folder.is_dir() else []
    if files:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\n".encode())
            h.update(f.read_bytes())
        digest = h.hexdigest()
    else:
        digest = sha256_bytes(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    return dict(cls=type(tokenizer).__name__, size=len(tokenizer), pad_id=pad_id(tokenizer),
                files_sha256=digest)


def cache_key(tokenizer, hp: EditHParams, weights_sha: str) -> dict:
    return dict(format=FORMAT, weights_sha256=weights_sha, tokenizer=tokenizer_identity(tokenizer),
                n_context=hp.n_context, context_tokens=hp.context_tokens, context_seed=hp.context_seed,
                seeds=list(_seeds(hp)), sampling=dict(do_sample=True, top_k=TOP_K))


def cache_path(key: dict) -> Path:
    from .models import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_root() / "contexts" / f"{digest[:32]}.json"


def _contexts_sha(contexts: list[str]) -> str:
    return sha256_bytes(json.dumps(contexts, ensure_ascii=False).encode())


def read_cached(path: Path, key: dict) -> tuple[list[str] | None, str]:
    """(prefixes, "") from a cache file that matches `key` and its stored hash, else (None, why)."""
    if not path.exists() and not path.is_symlink():
        return None, ""
    try:
        if path.is_symlink():
            raise OSError("it is a symlink")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return None, f"contexts cache {path} is unreadable ({getattr(e, 'strerror', None) or e})"
    except (ValueError, RecursionError) as e:
        return None, f"contexts cache {path} is not valid JSON ({str(e).splitlines()[0][:80]})"
    if not isinstance(doc, dict):
        return None, f"contexts cache {path} holds a JSON {type(doc).__name__}, not an object"
    contexts = doc.get("contexts")
    if doc.get("key") != key:
        return None, f"contexts cache {path} was made for another key"
    if not (isinstance(contexts, list) and all(isinstance(c, str) for c in contexts)
            and len(contexts) == key["n_context"] + 1 and doc.get("sha256") == _contexts_sha(contexts)):
        return None, f"contexts cache {path} is corrupt (its prefixes do not match its stored sha256)"
    return contexts, ""


def context_prefixes(model, tokenizer, hp: EditHParams, *, weights_sha: str | None = None) -> list[str]:
    """"" plus `n_context` short model-generated prefixes ("<text>. "), reproducible by seed.

    With `weights_sha`, the prefixes are cached on disk (see the module docstring).
    """
    if hp.n_context == 0:
        return [""]
    if not weights_sha:
        return generate_prefixes(model, tokenizer, hp)
    key = cache_key(tokenizer, hp, weights_sha)
    path = cache_path(key)
    contexts, why = read_cached(path, key)
    if contexts is not None:
        return contexts
    if why:
        log.warning("%s: generating the prefixes again", why)
    contexts = generate_prefixes(model, tokenizer, hp)
    doc = dict(key=key, sha256=_contexts_sha(contexts), contexts=contexts)
    try:
        from .models import cache_root

        check_inside(path, cache_root())
        atomic_write_text(path, json.dumps(doc, ensure_ascii=False, indent=1, sort_keys=True) + "\n",
                          fsync=False)
    except OSError as e:  # a read-only or foreign cache: use the prefixes, say why none was kept
        log.warning("contexts cache %s not written (%s)", path, getattr(e, "strerror", None) or e)
    return contexts


def _seeds(hp: EditHParams) -> tuple[str, ...]:
    return tuple(CONTEXT_SEEDS[i % len(CONTEXT_SEEDS)] for i in range(hp.n_context))


def generate_prefixes(model, tokenizer, hp: EditHParams) -> list[str]:
    """Sample the prefixes (top-k, seeded; the global RNG is left untouched)."""
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end
    try:
        enc = tokenizer(list(_seeds(hp)), return_tensors="pt", padding=True)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(hp.context_seed)
            out = model.generate(**enc, do_sample=True, top_k=TOP_K, max_new_tokens=hp.context_tokens,
                                 pad_token_id=pad_id(tokenizer))  # (n_context, prompt + new tokens)
    finally:
        tokenizer.padding_side = saved_side
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    clean = [" ".join(t.replace("{", " ").replace("}", " ").split()) for t in texts]
    return [""] + [t + ". " for t in clean]
