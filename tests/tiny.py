"""Tiny randomly initialised causal LMs of each supported family, built from configs (no downloads).

`tiny_model(family)` returns (model, tokenizer-free vocab size); `save_tiny(family, path)` writes a
Hugging Face folder (config + safetensors + a small word-level tokenizer) that every loader accepts.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig,
                          MistralConfig, Qwen2Config)

VOCAB = 512
FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2")


def tiny_config(family: str, n_layers: int = 4, d: int = 32):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=d, n_head=4, n_positions=128, n_inner=4 * d, **common)
    if family == "gptj":
        return GPTJConfig(n_layer=n_layers, n_embd=d, n_head=4, n_positions=128, rotary_dim=4, n_inner=4 * d, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=4,
                             intermediate_size=4 * d, max_position_embeddings=128, **common)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=3 * d, max_position_embeddings=128, tie_word_embeddings=True, **common)


def tiny_model(family: str = "llama", seed: int = 0, init_range: float | None = None, **kw):
    """init_range: weight init std; the default 0.02 gives near-uniform next-token distributions
    that no edit can make confident, so behavioural tests use a larger one (e.g. 0.3)."""
    torch.manual_seed(seed)
    config = tiny_config(family, **kw)
    if init_range is not None:
        config.initializer_range = init_range
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_tokenizer(single_tokens: tuple[str, ...] | list[str] = ()):
    """A byte-level BPE word tokenizer over a fixed vocabulary (letters, digits, punctuation), as a
    transformers fast tokenizer. Every word is spelled letter by letter, except the words in
    `single_tokens`, which with their leading space (" Rome") become one token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"]
    words += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    words += [str(i) for i in range(10)] + list(".,;:!?'\"-()")
    words.append("Ġ")  # byte-level space: " Rome" and "Rome" tokenise differently
    merges = []
    for w in single_tokens:  # " Rome" -> one token "ĠRome"
        prev = "Ġ"
        for ch in w:
            merges.append((prev, ch))
            prev += ch
            words.append(prev)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(dict.fromkeys(merges)), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def save_tiny(family: str, path: Path, seed: int = 0) -> Path:
    path = Path(path)
    tiny_model(family, seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
