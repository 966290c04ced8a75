"""A long sequential-editing run that can be stopped and resumed with the same result.

    python bench/lifelong_long.py --editor ultraedit --n 10000 --batch 100 --out runs/ue10k
    # killed, or stopped with --stop-after 20 (batches this session)? run the same command again.

State in --out (one folder per run):
- progress.json: the run's config (a resume must match it), batches done, the curve, per-batch
  log, and the name and sha256 of the state file it belongs to;
- state-<batches>.safetensors: the edited layers' weights and the editor's lifelong state (the
  key memory M of the closed-form editors, or UltraEdit's running statistics), after that batch.
A checkpoint writes the state file first (atomically), then progress.json (atomically), then
deletes older state files, so a kill at any point leaves a consistent pair. Resume checks the
state file's sha256 against progress.json before loading it. The run is deterministic given its
config (editors are deterministic on a fixed thread count), so resume gives the same result as
an uninterrupted run: tests/bench/test_lifelong_long.py.

Curves every --curve-every edits: CounterFact success AND top-1 over a fixed sample of the facts
edited so far (--eval-sample, seeded), perplexity on held-out WikiText vs the base, ‖ΔW‖/‖W‖ per
edited layer, generation entropy (--entropy-prompts, ROME's fluency measure) and seconds per
fact. `--editor none` edits nothing and evaluates the unedited model on the same samples at the
same points: the baseline row (the neighbourhood target is "unedited − 0.05").
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from knowledger.editors.apply import apply_deltas, weight_sha256
from knowledger.editors.evaluate import aggregate, fact_metrics
from knowledger.editors.fileio import atomic_write_bytes, atomic_write_text, sha256_file
from knowledger.editors.health import weight_norms

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


class ResumeMismatch(ValueError):
    """The folder holds a run with another config, or a state file that fails its hash."""


class Stream:
    """An editor and its lifelong state behind one step(batch) and state tensors."""

    def __init__(self, name: str, editor, memory=None):
        self.name, self.editor, self.memory = name, editor, memory

    @property
    def layers(self):
        return self.editor.layers if self.editor is not None else ()

    def step(self, model, batch) -> dict:
        if self.name == "none":
            return {}
        if self.name == "ultraedit":
            res = self.editor.compute(batch)
            apply_deltas(model, self.editor.spec, res.deltas)
            self.editor.advance(self.editor.last_step)
        else:
            res = self.editor.compute(batch, memory=self.memory)
            apply_deltas(model, self.editor.spec, res.deltas)
            self.memory.add({l: K for l, K in res.keys.items()})
        return res.timings

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.name == "none":
            return {"none": torch.zeros(1)}
        if self.name == "ultraedit":
            return {f"stats.{k}": v for k, v in self.editor.state.to_tensors().items()}
        out = {f"memory.{l}": s for l, s in self.memory.sums.items()}
        out.update({f"memory_n.{l}": torch.tensor([n]) for l, n in self.memory.counts.items()})
        return out

    def load_state(self, t: dict[str, torch.Tensor]) -> None:
        if self.name == "none":
            return
        if self.name == "ultraedit":
            from knowledger.editors.lifelong_norm import LifelongStats

            self.editor.state = LifelongStats.from_tensors({k[6:]: v for k, v in t.items() if k.startswith("stats.")})
            return
        for k, v in t.items():
            if k.startswith("memory."):
                self.memory.sums[int(k[7:])] = v.to(torch.float64)
            elif k.startswith("memory_n."):
                self.memory.counts[int(k[9:])] = int(v[0])


class LedgerStream(Stream):
    """An editor as the agent runs it: each batch is submitted to a workspace (--out/ws) and applied
    by agent.apply: the scheduler's choice of editor (`auto`), the past-edit memory, NAS anchors and
    the `consolidate_every` rule, all from the ledger. The ledger is the editor's state, so a
    checkpoint holds only the edited layers' weights; `load_state` (resume) and every step read
    the live weights back from the ledger.

    A batch is tagged with its index in the facts' `source` ("bench:<index>"), so a kill between
    the apply's commit and the checkpoint does not apply it twice: the resumed step sees the
    batch already applied and only reads the weights (its seconds are then not counted)."""

    def __init__(self, model, ws_dir: Path, editor: str, layers, *, batch: int, consolidate_every: int = 0,
                 corpus=None, overrides: dict | None = None, base_model: str | None = None,
                 stats_tokens: int | None = None):
        super().__init__(editor, None)
        self._model = model  # the benchmark's model, which every step's live weights are copied into
        self.ws_dir, self.batch, self.corpus, self.stats_tokens = ws_dir, batch, corpus, stats_tokens
        self.overrides = dict(overrides or {})
        self._layers = tuple(layers)
        self.index = 0  # batches stepped so far (set from the checkpoint on resume)
        import knowledger
        from knowledger.agent import config as settings

        with knowledger.init(str(ws_dir), model=base_model) as ws:
            settings.set_value(ws, "consolidate_every", str(int(consolidate_every)))

    @property
    def layers(self):
        return self._layers

    def _counts(self, ws, tag: str) -> dict:
        from sqlalchemy import func, select

        from knowledger.ledger.models import Request

        with ws.reading() as s:
            rows = s.execute(select(Request.status, func.count()).where(Request.source == tag)
                             .group_by(Request.status)).all()
        return {getattr(k, "value", k): n for k, n in rows}

    def step(self, model, batch) -> dict:
        import knowledger

        tag = f"bench:{self.index}"
        timings: dict = {}
        with knowledger.open_workspace(str(self.ws_dir)) as ws:
            if not self._counts(ws, tag):
                knowledger.submit(ws, [_fact_dict(r) for r in batch], source=tag)
            if self._counts(ws, tag).get("pending"):
                result = knowledger.apply(ws, editor=self.name, batch_size=self.batch, corpus=self.corpus,
                                          stats_tokens=self.stats_tokens, overrides=self.overrides or None,
                                          audit="never")
                editors = sorted({op.editor for op in result.operations if op.editor})
                timings["editors"] = ",".join(editors)
                if result.consolidation is not None:
                    timings["consolidated"] = 1.0
            counts = self._counts(ws, tag)
            timings["applied"] = float(counts.get("applied", 0))
            self._read_live(ws, model)
        self.index += 1
        return timings

    def _read_live(self, ws, model) -> None:
        from knowledger.agent.export import open_for_reading

        live, _, _ = open_for_reading(ws, "bench")
        with torch.no_grad():
            for name, p in live.model.named_parameters():
                model.get_parameter(name).copy_(p)
        del live

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"ledger_index": torch.tensor([self.index])}

    def load_state(self, t: dict[str, torch.Tensor]) -> None:
        import knowledger

        self.index = int(t["ledger_index"][0])
        with knowledger.open_workspace(str(self.ws_dir)) as ws:
            self._read_live(ws, self._model)


def _fact_dict(r) -> dict:
    """An editors.EditRequest as a fact for knowledger.submit."""
    return dict(prompt=r.prompt, subject=r.subject, target_new=r.target_new, target_true=r.target_true,
                paraphrases=list(r.paraphrases), neighborhood=[list(pair) for pair in r.neighborhood])


def _write_checkpoint(out: Path, model, spec, stream: Stream, progress: dict) -> None:
    tensors = {f"weight.{l}": model.get_parameter(spec.weight_name(l)).detach().contiguous()
               for l in stream.layers}
    tensors.update(stream.state_tensors())
    name = f"state-{progress['batches_done']:06d}.safetensors"
    atomic_write_bytes(out / name, save({k: v.contiguous() for k, v in tensors.items()}))
    progress["state"] = dict(file=name, sha256=sha256_file(out / name))
    atomic_write_text(out / "progress.json", json.dumps(progress, indent=1, sort_keys=True))
    for old in out.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def _resume(out: Path, config: dict, model, spec, stream: Stream) -> dict | None:
    path = out / "progress.json"
    if not path.is_file():
        return None
    progress = json.loads(path.read_text(encoding="utf-8"))
    if not same_config(progress["config"], config):
        raise ResumeMismatch(f"{out} holds a run with another config; use a new --out")
    state = out / progress["state"]["file"]
    if not state.is_file() or sha256_file(state) != progress["state"]["sha256"]:
        raise ResumeMismatch(f"{state} is missing or does not match its sha256 in progress.json")
    t = load_file(str(state))
    with torch.no_grad():
        for l in stream.layers:
            model.get_parameter(spec.weight_name(l)).copy_(t[f"weight.{l}"])
    stream.load_state(t)
    return progress


def same_config(saved: dict, now: dict) -> bool:
    """Whether a resumed run has the config it started with. An editor hyperparameter that a
    later knowledger added (absent from the saved config) counts as the same when it has its
    default value: the run is then computed exactly as before, and a code update between two
    working days does not strand a run."""
    if saved == now:
        return True
    import dataclasses

    from knowledger.editors.hparams import EditHParams

    a, b = dict(saved), dict(now)
    ha, hb = dict(a.pop("hparams", None) or {}), dict(b.pop("hparams", None) or {})
    if a != b or set(ha) - set(hb) or any(ha[k] != hb[k] for k in ha):
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(EditHParams)
                if f.default is not dataclasses.MISSING}
    return all(k in defaults and hb[k] == defaults[k] for k in set(hb) - set(ha))


def run(model, tokenizer, spec, requests, stream: Stream, out: Path, config: dict, *,
        checkpoint_every: int = 10, curve_every: int = 1000, curve_at=(), eval_sample: int = 500,
        perplexity_fn=None, entropy_fn=None, stop_after: int | None = None, log=print) -> dict:
    """Edit `requests` in batches of config["batch"] from where `out` stopped; returns progress.

    stop_after: end (after a checkpoint) once this many batches ran in this call: a working day.
    curve_at: evaluate (also) after the batch that reaches each of these edit counts.
    """
    out.mkdir(parents=True, exist_ok=True)
    B = int(config["batch"])
    base = {l: model.get_parameter(spec.weight_name(l)).detach().clone() for l in stream.layers}
    base_sha = {str(l): weight_sha256(w) for l, w in base.items()}  # the model must start at the base
    progress = _resume(out, config, model, spec, stream)
    if progress is None:
        progress = dict(config=config, batches_done=0, curve=[], batches=[], edit_s=0.0,
                        base_weights_sha256=base_sha,
                        perplexity_base=perplexity_fn(model) if perplexity_fn else None)
    else:
        if progress["base_weights_sha256"] != base_sha:
            raise ResumeMismatch("resume must start from the base weights the run started from")
        log(f"resuming after batch {progress['batches_done']} ({progress['batches_done'] * B} edits)")
    rng = random.Random(0)
    order = list(range(len(requests)))
    rng.shuffle(order)  # fixed evaluation sample order: the first facts of it that are edited
    n_batches = math.ceil(len(requests) / B)
    ran = 0
    for b in range(progress["batches_done"], n_batches):
        batch = requests[b * B : (b + 1) * B]
        t = time.perf_counter()
        timings = stream.step(model, batch)
        secs = time.perf_counter() - t
        progress["edit_s"] += secs
        progress["batches_done"] = b + 1
        done = min((b + 1) * B, len(requests))
        progress["batches"].append(dict(index=b + 1, n=len(batch), seconds=secs,
                                        **{k: v for k, v in timings.items() if isinstance(v, (float, str))}))
        reached = any(done - len(batch) < c <= done for c in curve_at)
        if done % curve_every < B or reached or b + 1 == n_batches:
            cur = {l: model.get_parameter(spec.weight_name(l)) for l in stream.layers}
            sample = [requests[i] for i in order if i < done][:eval_sample]
            point = dict(edits=done, metrics=aggregate(fact_metrics(model, tokenizer, sample)),
                         n_eval=len(sample), seconds_per_fact=progress["edit_s"] / done,
                         norms={str(k): v for k, v in weight_norms(cur, base).items()})
            if perplexity_fn:
                point["perplexity"] = perplexity_fn(model)
                point["perplexity_ratio"] = point["perplexity"] / progress["perplexity_base"]
            if entropy_fn:
                point["generation_entropy"] = entropy_fn(model)
            progress["curve"].append(point)
            log(json.dumps(dict(edits=done, **{k: round(v, 4) for k, v in point["metrics"].items()})))
        ran += 1
        last = b + 1 == n_batches or (stop_after is not None and ran >= stop_after)
        if (b + 1) % checkpoint_every == 0 or last:
            _write_checkpoint(out, model, spec, stream, progress)
        if last:
            break
    return progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--editor", default="ultraedit")
    ap.add_argument("--facts", default=str(DATA / "counterfact" / "counterfact-train.json"))
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--curve-every", type=int, default=1000)
    ap.add_argument("--curve-at", type=int, nargs="*", default=[],
                    help="also evaluate when the edits done reach these counts (e.g. 100 1000)")
    ap.add_argument("--corpus", default="wiki",
                    help="key statistics from: wiki (../shared/data WikiText-2, the default), sampled "
                         "(text the model samples itself, the first-run default) or a text file")
    ap.add_argument("--eval-sample", type=int, default=500)
    ap.add_argument("--heldout", type=int, default=4096)
    ap.add_argument("--entropy-prompts", type=int, default=50,
                    help="generation entropy over the rewrite prompts of the first N facts (0: off)")
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--hparams", default="{}", help="JSON overrides of the editor's hyperparameters")
    ap.add_argument("--ledger", action="store_true",
                    help="run the editor (e.g. auto) through a workspace in OUT/ws: submit + apply per batch")
    ap.add_argument("--consolidate-every", type=int, default=0,
                    help="with --ledger: the workspace's consolidate_every (0: never)")
    a = ap.parse_args()
    from knowledger.agent.bench import load_requests
    from knowledger.agent.editing import open_model

    lm = open_model()
    reqs, _ = load_requests(Path(a.facts), a.n, a.offset)
    overrides = json.loads(a.hparams)
    if a.ledger:
        stream = ledger_stream(lm, Path(a.out) / "ws", a.editor, overrides, corpus=a.corpus, batch=a.batch,
                               consolidate_every=a.consolidate_every)
    else:
        stream = make_stream(lm, a.editor, overrides, corpus=a.corpus)
    config = dict(editor=a.editor, facts=Path(a.facts).name, offset=a.offset, n=len(reqs), batch=a.batch,
                  hparams=stream_hparams(stream), model_sha256=lm.weights_sha256)
    if a.ledger:
        config.update(ledger=True, overrides=overrides, consolidate_every=a.consolidate_every)
    if a.corpus != "wiki":  # (absent from runs made before the option: they resume unchanged)
        config["corpus"] = a.corpus
    ppl = None
    if a.heldout:
        from knowledger.editors.corpus import Corpus
        from knowledger.editors.health import heldout_chunks, perplexity

        chunks = heldout_chunks(Corpus.from_path(DATA / "corpus" / "wiki.test.raw"), lm.tokenizer, a.heldout,
                                skip_tokens=100_000)
        ppl = lambda m: perplexity(m, lm.tokenizer, chunks)  # noqa: E731
    ent = None
    if a.entropy_prompts:
        from knowledger.editors.health import generation_entropy

        prompts = [r.text for r in reqs[: a.entropy_prompts]]
        ent = lambda m: generation_entropy(m, lm.tokenizer, prompts)  # noqa: E731
    run(lm.model, lm.tokenizer, lm.spec, reqs, stream, Path(a.out), config, checkpoint_every=a.checkpoint_every,
        curve_every=a.curve_every, curve_at=a.curve_at, eval_sample=a.eval_sample, perplexity_fn=ppl, entropy_fn=ent,
        stop_after=a.stop_after,
        log=lambda s: print(s, flush=True))


def make_stream(lm, name: str, overrides: dict, corpus: str = "wiki") -> Stream:
    if name == "none":
        return Stream(name, None)
    if name == "ultraedit":
        from knowledger.editors.ultraedit import UltraEditor, preset_for

        hp, _ = preset_for(lm.model)
        return Stream(name, UltraEditor(lm.model, lm.tokenizer, hp.replace(**overrides)))
    from knowledger.agent.editing import make_editor, resolve_hparams
    from knowledger.editors.memory import KeyMemory

    hp = resolve_hparams(lm, None, overrides)
    return Stream(name, make_editor(lm, name, hp, corpus_path(corpus), progress=False), KeyMemory())


def ledger_stream(lm, ws_dir: Path, editor: str, overrides: dict, *, corpus: str = "wiki", batch: int,
                  consolidate_every: int = 0) -> LedgerStream:
    """A LedgerStream whose weight checkpoints cover every layer the closed-form editors and
    ultraedit edit on this model (consolidation re-solves the former)."""
    from knowledger.agent.editing import resolve_hparams
    from knowledger.editors.ultraedit import preset_for

    layers = set(resolve_hparams(lm, None, overrides).layers) | set(preset_for(lm.model)[0].layers)
    path = corpus_path(corpus)
    return LedgerStream(lm.model, ws_dir, editor, sorted(layers), batch=batch, consolidate_every=consolidate_every,
                        corpus=str(path) if path else None, overrides=overrides)


def corpus_path(corpus: str):
    """--corpus as the editors take it: WikiText-2's file for "wiki", None (the model's own
    sampled text) for "sampled", else the path given."""
    return {"wiki": DATA / "corpus" / "wiki.test.raw", "sampled": None}.get(corpus, corpus)


def stream_hparams(stream: Stream) -> dict:
    return stream.editor.hp.to_dict() if stream.editor is not None else {}


if __name__ == "__main__":
    main()
