"""Key second moments C = E[k kᵀ] and corpora, on tiny random models (plus one real-model timing)."""
import json
import logging
import time

import pytest
import torch
from safetensors import safe_open

from knowledger.editors import stats
from knowledger.editors.corpus import Corpus
from knowledger.editors.model_spec import spec_for
from knowledger.editors.stats import second_moments
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer

TEXT = """ = Valley Rivers =

 The river rises in the hills north of the old town and runs south for many miles .
 It was known to early travellers , who wrote of its clear water and its many fish .

 = = History = =

 In the year 1820 a stone bridge was built ; it still stands , although the road has moved .
 Mills along the banks made cloth and paper . Most closed before 1900 , and few remain .
 A short line .

 The valley is now a park . Visitors walk the path from the bridge to the falls , a walk of 2 @-@ 3 hours .
 Birds nest in the reeds in spring ; in autumn the trees turn red and gold and the river runs high .
"""


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "valley.txt"
    path.write_text(TEXT * 3)
    return Corpus.from_path(path)


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def _brute_force(model, tokenizer, corpus, layers, n_tokens, seq_len):
    """Run each sequence alone through the whole model; hook the projections by hand."""
    spec = spec_for(model)
    seen = {i: [] for i in layers}
    handles = [spec.mlp_out_module(model, i).register_forward_hook(
        lambda m, args, out, i=i: seen[i].append(args[0][0].double())) for i in layers]
    try:
        with torch.no_grad():
            for seq in corpus.chunks(tokenizer, n_tokens, seq_len):
                model(torch.tensor([seq]))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i in layers:
        K = torch.cat(seen[i])  # (N, d_in)
        out[i] = K.T @ K / K.shape[0]
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_brute_force(family, corpus, tmp_path):
    model, tok = tiny_model(family), tiny_tokenizer()
    layers = [0, 2]
    got = second_moments(model, tok, layers, corpus, 700, seq_len=64, batch_size=4, progress=False,
                         cache_dir=tmp_path / "stats", autocast_bf16=False)
    want = _brute_force(model, tok, corpus, layers, 700, 64)
    d_in = spec_for(model).mlp_dims(model)[1]
    for i in layers:
        assert got[i].shape == (d_in, d_in) and got[i].dtype == torch.float32
        assert torch.equal(got[i], got[i].T)
        torch.testing.assert_close(got[i].double(), want[i], rtol=1e-5, atol=1e-6)


def test_padding_is_excluded(corpus):
    """Sequences of different lengths, batched differently, give the same C."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lengths = {len(c) for c in corpus.chunks(tok, 600, 96)}
    assert len(lengths) > 2  # the corpus really yields ragged sequences
    results = [second_moments(model, tok, [1, 3], corpus, 600, seq_len=96, batch_size=bs,
                              progress=False, cache=False, autocast_bf16=False) for bs in (1, 3, 7)]
    for other in results[1:]:
        for i in (1, 3):
            torch.testing.assert_close(other[i], results[0][i], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("units", [False, True])
def test_default_forward_follows_the_hosts_bf16_units(units, corpus, tmp_path, monkeypatch):
    """autocast_bf16=None asks `has_bf16_units`: the same C, from the same cache file, as passing
    what it answers (hosts of this machine kind differ: AVX2 on some, AVX512-BF16 on others)."""
    monkeypatch.setattr(stats, "has_bf16_units", lambda device: units)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kw = dict(progress=False, cache_dir=tmp_path / "stats", seq_len=64, batch_size=4)
    default = second_moments(model, tok, [0], corpus, 300, **kw)[0]
    calls, handle = _count_forwards(model)
    explicit = second_moments(model, tok, [0], corpus, 300, autocast_bf16=units, **kw)[0]
    handle.remove()
    assert not calls and torch.equal(default, explicit)
    other = second_moments(model, tok, [0], corpus, 300, autocast_bf16=not units, **kw)[0]
    assert not torch.equal(other, default)


def test_float64_and_validation(corpus):
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    c = second_moments(model, tok, [1], corpus, 200, dtype="float64", progress=False, cache=False,
                       autocast_bf16=False)[1]
    assert c.dtype == torch.float64 and torch.equal(c, c.T)
    assert torch.linalg.eigvalsh(c).min() > -1e-10  # positive semi-definite
    with pytest.raises(ValueError, match="out of range"):
        second_moments(model, tok, [9], corpus, 200, progress=False)
    with pytest.raises(ValueError, match="float32 or float64"):
        second_moments(model, tok, [1], corpus, 200, dtype=torch.float16, progress=False)


def test_cache_hit_and_key_changes(corpus, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    calls, handle = _count_forwards(model)
    folder = tmp_path / "stats"
    # float32 forward pinned: the default follows the host's bf16 units (test_default_forward_...)
    kw = dict(progress=False, cache_dir=folder, seq_len=64, batch_size=4, autocast_bf16=False)
    first = second_moments(model, tok, [0, 2], corpus, 500, **kw)
    assert calls and len(list(folder.glob("*.safetensors"))) == 2
    calls.clear()
    again = second_moments(model, tok, [2, 0], corpus, 500, **kw)
    assert not calls  # served from the cache, the model never ran
    assert all(torch.equal(first[i], again[i]) for i in (0, 2))
    partly = second_moments(model, tok, [0, 1], corpus, 500, **kw)  # only layer 1 is new
    assert calls and torch.equal(partly[0], first[0])
    calls.clear()
    second_moments(model, tok, [0], corpus, 400, **kw)  # another token count: recomputed
    assert calls
    calls.clear()
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("river", "stream") * 3)
    second_moments(model, tok, [0], Corpus.from_path(other), 500, **kw)  # another corpus
    assert calls
    calls.clear()
    second_moments(model, tok, [0], corpus, 500, dtype="float64", **kw)  # another dtype
    assert calls
    calls.clear()
    fast = second_moments(model, tok, [0], corpus, 500, **dict(kw, autocast_bf16=True))  # bf16 forward
    assert calls and not torch.equal(fast[0], first[0])
    assert (fast[0] - first[0]).norm() < 0.05 * first[0].norm()
    handle.remove()

    # the key inside the file is what counts: a file whose key differs is recomputed
    key = dict(kind=stats._KIND, version=stats._VERSION, weights_sha256="0" * 64, layer=0,
               module="model.layers.0.mlp.down_proj", corpus_sha256=corpus.sha256, n_tokens=500,
               seq_len=64, dtype="float32", forward="model-dtype")
    path = folder / stats._file_name(key)
    stats._save(path, dict(key, n_tokens=1), torch.zeros(2, 2), 1)
    calls, handle = _count_forwards(model)
    got = second_moments(model, tok, [0], corpus, 500, weights_sha="0" * 64, **kw)
    assert calls and torch.equal(got[0], first[0])
    with safe_open(str(path), framework="pt") as f:  # ... and overwritten with the right key
        assert json.loads(f.metadata()["key"]) == key and f.metadata()["count"] == "500"
    path.write_bytes(b"not a safetensors file")
    calls.clear()
    assert torch.equal(second_moments(model, tok, [0], corpus, 500, weights_sha="0" * 64, **kw)[0],
                       first[0])
    assert calls
    handle.remove()


def test_corpus_documents_and_chunks(corpus, tmp_path):
    docs = list(corpus.documents())
    assert not any(d.lstrip().startswith("=") for d in docs)  # headings dropped
    assert "2-3 hours" in docs[2] and "@-@" not in "".join(docs)
    assert len(docs) == 9 and docs[1].count("\n") == 2  # a block of lines is one document
    tok = tiny_tokenizer()
    chunks = corpus.chunks(tok, 333, seq_len=50)
    assert sum(map(len, chunks)) == 333 and max(map(len, chunks)) <= 50
    assert all(len(c) >= 8 for c in chunks[:-1])
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "first doc"}\n\n{"text": ""}\n{"text": "second", "id": 2}\n')
    c = Corpus.from_path(jsonl)
    assert c.format == "jsonl" and list(c.documents()) == ["first doc", "second"]
    assert len(c.sha256) == 64 and c.sha256 != corpus.sha256
    with pytest.raises(FileNotFoundError):
        Corpus.from_path(tmp_path / "missing.txt")


def test_sampled_corpus_is_deterministic_and_cached(tmp_path):
    model, tok = tiny_model("llama", n_layers=2), tiny_tokenizer()
    kw = dict(batch_size=4, max_new_tokens=6, progress=False)
    a = Corpus.sampled(model, tok, 40, seed=3, cache_dir=tmp_path / "a", **kw)
    b = Corpus.sampled(model, tok, 40, seed=3, cache_dir=tmp_path / "b", **kw)
    assert a.path.read_text() == b.path.read_text() and a.sha256 == b.sha256
    calls, handle = _count_forwards(model)
    again = Corpus.sampled(model, tok, 40, seed=3, cache_dir=tmp_path / "a", **kw)
    handle.remove()
    assert not calls and again == a
    c = Corpus.sampled(model, tok, 40, seed=4, cache_dir=tmp_path / "a", **kw)
    assert c.sha256 != a.sha256 and c.path.name.endswith("-40-4.txt")
    # the global RNG is left as it was
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    Corpus.sampled(model, tok, 40, seed=5, cache_dir=tmp_path / "a", **kw)
    assert torch.equal(torch.rand(3), x)


def test_no_corpus_samples_one(tmp_path):
    model, tok = tiny_model("gpt2", n_layers=2), tiny_tokenizer()
    c = second_moments(model, tok, [0], None, 60, progress=False)[0]
    assert torch.isfinite(c).all()
    assert list((tmp_path / "cache" / "corpora").glob("*-60-0.txt"))


@pytest.mark.model
def test_real_model_layers_3_to_8_timing(shared_data, tmp_path_factory, monkeypatch, caplog):
    path = shared_data / "corpus" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    from knowledger.editors.models import load_model

    monkeypatch.setenv("KNOWLEDGER_CACHE", str(tmp_path_factory.getbasetemp() / "knowledger-real"))
    model, tok = load_model()
    caplog.set_level(logging.INFO, logger="knowledger.editors.stats")
    start = time.perf_counter()
    c = second_moments(model, tok, range(3, 9), path, 100_000, progress=False)
    seconds = time.perf_counter() - start
    assert sorted(c) == [3, 4, 5, 6, 7, 8] and c[3].shape == (1536, 1536)
    assert all(torch.isfinite(m).all() for m in c.values())
    print(f"\nC for layers 3-8 from 100,000 tokens: {seconds:.1f} s "
          f"({100_000 / seconds:.0f} tokens/s, weights hash included)")
    start = time.perf_counter()
    cached = second_moments(model, tok, range(3, 9), path, 100_000, progress=False)
    print(f"cached reload: {time.perf_counter() - start:.2f} s")
    assert all(torch.equal(c[i], cached[i]) for i in c)


@pytest.mark.model
def test_real_model_bf16_autocast_is_close(shared_data, tmp_path_factory, monkeypatch):
    path = shared_data / "corpus" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    from knowledger.editors.models import load_model

    monkeypatch.setenv("KNOWLEDGER_CACHE", str(tmp_path_factory.getbasetemp() / "knowledger-real"))
    model, tok = load_model()
    times, moments = {}, {}
    for fast in (False, True):
        start = time.perf_counter()
        moments[fast] = second_moments(model, tok, [3, 8], path, 4096, progress=False, cache=False,
                                       autocast_bf16=fast)
        times[fast] = time.perf_counter() - start
    errors = {i: float((moments[True][i] - moments[False][i]).norm() / moments[False][i].norm())
              for i in (3, 8)}
    print(f"\n4096 tokens, layers 3 and 8: float32 {times[False]:.1f} s, bf16 autocast "
          f"{times[True]:.1f} s; relative Frobenius difference {errors}")
    assert max(errors.values()) < 0.03


# --- the first run: sampled statistics, progress when nothing is a terminal, verified caches ------
def test_first_run_path_samples_and_reports_progress(tmp_path, caplog):
    """No corpus (the README's path): the model samples one, C is built, an editor edits with it,
    and every phase reports through the callback and an INFO line (no terminal involved)."""
    from knowledger.editors.editor import Editor
    from knowledger.editors.hparams import EditHParams
    from knowledger.editors.requests import EditRequest

    model, tok = tiny_model("llama"), tiny_tokenizer()
    seen = []
    caplog.set_level(logging.INFO, logger="knowledger.editors")
    C = second_moments(model, tok, [1, 2], None, 300, cache_dir=tmp_path / "stats",
                       progress=lambda phase, done, total: seen.append((phase, done, total)))
    phases = [p for p, _, _ in seen]
    assert set(phases) == {"sample"}  # the keys are collected while sampling: no second pass
    dones = [d for p, d, _ in seen]
    totals = {t for _, _, t in seen}
    assert dones == sorted(dones) and dones[0] == 0 and len(totals) == 1
    assert dones[-1] == totals.pop()  # finished, and said so
    assert len(set(dones)) > 10  # one batch here (5 rows), yet reports at every step, not at its end
    text = caplog.text
    assert "sampling 300 tokens" in text and text.count("done in") == 1
    assert "keys per layer collected while sampling" in text
    hp = EditHParams(layers=(1, 2), v_steps=3, n_context=1)
    req = EditRequest(prompt="The capital of {} is", subject="Valley", target_new="Rome",
                      target_true="Paris")
    result = Editor(model, tok, hp, method="emmet", second_moments=C).compute([req])
    assert [d.layer for d in result.deltas] == [1, 2]
    assert all(torch.isfinite(d.left).all() and torch.isfinite(d.right).all() for d in result.deltas)


def test_flipped_bit_and_unreadable_stats_cache_are_rebuilt(corpus, tmp_path, caplog):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kw = dict(cache_dir=tmp_path / "stats", seq_len=64, batch_size=4)
    first = second_moments(model, tok, [0], corpus, 500, **kw)[0]
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert len(f.metadata()["sha256"]) == 64
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # one bit of the tensor's bytes (the data sits at the end of the file)
    path.write_bytes(bytes(data))
    calls, handle = _count_forwards(model)
    caplog.set_level(logging.WARNING, logger="knowledger.editors.stats")
    again = second_moments(model, tok, [0], corpus, 500, **kw)[0]
    assert calls and torch.equal(again, first)  # recomputed, not the corrupted copy
    assert "corrupt" in caplog.text and str(path) in caplog.text
    calls.clear(); caplog.clear()
    assert second_moments(model, tok, [0], corpus, 500, **kw)[0].equal(first) and not calls  # rebuilt
    path.write_bytes(b"\x00" * 40)
    assert second_moments(model, tok, [0], corpus, 500, **kw)[0].equal(first) and calls
    assert "unreadable" in caplog.text and str(path) in caplog.text
    handle.remove()


def test_null_space_cache_is_verified(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 8, generator=g)
    C = A @ A.T / 8  # (16, 16), rank 8
    basis, info = stats.null_space(C, 0.02, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger="knowledger.editors.stats")
    again, _ = stats.null_space(C, 0.02, cache_dir=tmp_path)
    assert torch.equal(again, basis) and "corrupt" in caplog.text


def test_sampled_corpus_cache_holds_its_key(tmp_path, caplog):
    model, tok = tiny_model("llama", n_layers=2), tiny_tokenizer()
    kw = dict(batch_size=4, max_new_tokens=6, cache_dir=tmp_path)
    a = Corpus.sampled(model, tok, 40, **kw)
    head = a.path.read_text().split("\n", 1)[0]
    meta = json.loads(head.split("corpus ", 1)[1])
    assert meta["key"]["n_tokens"] == 40 and meta["key"]["max_new_tokens"] == 6
    assert len(meta["text_sha256"]) == 64
    assert not any("knowledger sampled corpus" in d for d in a.documents())  # the key is no document
    caplog.set_level(logging.WARNING, logger="knowledger.editors.corpus")
    a.path.write_text(a.path.read_text().replace("\n\n", "\n\nx", 1))  # text no longer matches
    b = Corpus.sampled(model, tok, 40, **kw)
    assert "corrupt" in caplog.text and b.sha256 == a.sha256  # sampled again, the same text
    caplog.clear()
    c = Corpus.sampled(model, tok, 40, **dict(kw, max_new_tokens=5))  # same file name, other key
    assert "other settings" in caplog.text and c.sha256 != a.sha256
    a.path.write_bytes(b"\xff\xfe garbage")
    Corpus.sampled(model, tok, 40, **kw)
    assert "unreadable" in caplog.text or "sampling it again" in caplog.text


# --- keys collected while sampling (KeyTap) ---------------------------------------------------
def _rows_fed(model, tok, n_tokens, kw):
    """Each sampled row as the token ids the sampler's forward passes saw: its prompt and all but
    its last sampled token (re-run with the same seed, recording what `_generate` returned)."""
    from knowledger.editors import corpus as corpus_mod

    rows, real_generate = [], corpus_mod._generate

    def spy(model_, encoded, width, new, *args, **kwargs):
        out = real_generate(model_, encoded, width, new, *args, **kwargs)
        rows.extend(e + o[:-1] for e, o in zip(encoded, out.tolist()))
        return out

    corpus_mod._generate = spy
    try:
        Corpus.sampled(model, tok, n_tokens, **kw)
    finally:
        corpus_mod._generate = real_generate
    return rows


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_keys_collected_while_sampling_equal_a_full_forward(family, tmp_path):
    """C from the sampler's own KV-cache forwards (left padding, one column per step) equals C from
    a plain full forward of each row's token ids, to float rounding."""
    model, tok = tiny_model(family, n_layers=3), tiny_tokenizer()
    spec = spec_for(model)
    kw = dict(seed=1, batch_size=3, max_new_tokens=7, progress=False, autocast_bf16=False)
    tap = stats.KeyTap(model, spec, [0, 2])
    tap.flush_rows = 5  # several flushes
    Corpus.sampled(model, tok, 60, cache_dir=tmp_path / "a", observe=tap, **kw)
    rows = _rows_fed(model, tok, 60, dict(kw, cache_dir=tmp_path / "b"))
    assert len({len(r) for r in rows}) > 1  # prompts of different lengths: left padding was used
    seen = {i: [] for i in (0, 2)}
    handles = [spec.mlp_out_module(model, i).register_forward_hook(
        lambda m, args, out, i=i: seen[i].append(args[0][0].double())) for i in (0, 2)]
    try:
        with torch.no_grad():
            for r in rows:
                model(torch.tensor([r]))
    finally:
        for h in handles:
            h.remove()
    got = tap.moments("float64")
    for i in (0, 2):
        K = torch.cat(seen[i])  # (N, d_in)
        assert tap.count == K.shape[0] == sum(map(len, rows))
        want = K.T @ K / K.shape[0]
        assert torch.allclose(got[i], want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), i


def test_sampled_statistics_are_cached_and_reused(tmp_path, monkeypatch):
    """The first run samples and keeps the as-sampled C; a later one reads it without a forward;
    a layer asked for later comes from one pass over the cached text, not a new sample."""
    monkeypatch.setenv("KNOWLEDGER_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("llama", n_layers=3), tiny_tokenizer()
    first = second_moments(model, tok, [0, 1], None, 80, progress=False)
    calls, handle = _count_forwards(model)
    again = second_moments(model, tok, [0, 1], None, 80, progress=False)
    assert not calls and all(torch.equal(first[i], again[i]) for i in (0, 1))
    more = second_moments(model, tok, [1, 2], None, 80, progress=False)
    handle.remove()
    assert torch.equal(more[1], first[1]) and torch.isfinite(more[2]).all()
    assert len(list((tmp_path / "cache" / "corpora").glob("*.txt"))) == 1
    assert 0 < len(calls) < 10  # one pass over the cached text for layer 2, no sampling


# --- the sampler's draw and its KV cache -------------------------------------------------------
def test_inverse_cdf_draw_matches_the_softmax_and_skips_banned_tokens():
    """`_draw` samples softmax(logits): empirical frequencies within 4 standard errors of the
    probabilities on a skewed 6-token distribution, and a -inf token is never drawn, even at the
    start and the end of the vocabulary (where an off-by-one in the search would land)."""
    from knowledger.editors.corpus import _draw

    logits = torch.tensor([[float("-inf"), 2.0, 0.0, -1.0, 1.0, float("-inf")]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([_draw(logits, gen) for _ in range(5)])[:, 0]  # 20,000 draws
    freq = torch.bincount(ids, minlength=6).double() / ids.numel()
    p = torch.softmax(logits[0].double(), -1)
    se = (p * (1 - p) / ids.numel()).sqrt()
    assert freq[0] == 0 and freq[5] == 0
    assert ((freq - p).abs() <= 4 * se + 1e-12).all(), (freq, p)
    # one-hot rows: exactly that token
    hot = torch.full((3, 7), float("-inf"))
    hot[0, 0], hot[1, 6], hot[2, 3] = 0.0, 0.0, 0.0
    assert _draw(hot, gen)[:, 0].tolist() == [0, 6, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_static_kv_cache_samples_what_the_dynamic_one_does(family, monkeypatch):
    """The preallocated cache (full mask + cache_position) gives the same tokens as the
    concatenating one, on left-padded rows of different lengths (float64: no rounding flips)."""
    from knowledger.editors import corpus as corpus_mod
    from transformers import DynamicCache

    model = tiny_model(family, n_layers=2, init_range=0.3).double()
    encoded = [[1, 5, 9], [1, 7], [1, 11, 12, 13]]
    assert corpus_mod._kv_cache(model, 10)[1]  # these families take the static cache
    run = lambda: corpus_mod._generate(model, encoded, 4, 6, 0, [2], torch.Generator().manual_seed(3), "cpu")  # noqa: E731
    with torch.inference_mode():
        static = run()
        monkeypatch.setattr(corpus_mod, "_kv_cache", lambda m, n: (DynamicCache(), False))
        dynamic = run()
    assert torch.equal(static, dynamic)
    assert (static != 2).all()  # the banned token never appears
