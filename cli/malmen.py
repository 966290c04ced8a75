"""`knowledger train-malmen`: meta-train MALMEN's hyper-network (agent.malmen_train)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import click

from .common import echo_json, main_errors
from .main import cli


def _layers(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(x) for x in value.replace(" ", "").split(",") if x)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer numbers, got {value!r}", param_hint="--layers")


@cli.command("train-malmen")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training facts (CounterFact, zsRE or our layout); the last --val-facts are held out.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the hyper-network (hypernet.safetensors + config.json), checkpoint and history.")
@click.option("--model", "model_name", help="Model name or path [default: SmolLM2-135M-Instruct].")
@click.option("--steps", type=click.IntRange(1), default=500, show_default=True, help="Meta steps.")
@click.option("--batch", type=click.IntRange(1), default=64, show_default=True, help="Facts edited per meta step.")
@click.option("--limit", type=click.IntRange(2), help="Use only the file's first N valid facts (validation included).")
@click.option("--val-facts", type=click.IntRange(0), default=200, show_default=True,
              help="Held-out validation facts (the last of the file), edited in one batch.")
@click.option("--val-every", type=click.IntRange(1), default=100, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(1), default=25, show_default=True)
@click.option("--meta-lr", type=float, default=1e-4, show_default=True, help="Adam learning rate of the blocks.")
@click.option("--loc-coef", type=float, default=1.0, show_default=True, help="Weight of the locality KL.")
@click.option("--max-minutes", type=click.FloatRange(0, min_open=True),
              help="Stop after this much wall time (then validate, checkpoint, save).")
@click.option("--layers", help="Edited layers, e.g. 24,25,26 [default: the last fifth].")
@click.option("--rank", type=click.IntRange(1), default=128, show_default=True, help="Bottleneck of each block.")
@click.option("--blocks", type=click.IntRange(1), default=2, show_default=True, help="Residual blocks.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@main_errors
def train_malmen(data, out, model_name, steps, batch, limit, val_facts, val_every, ckpt_every, meta_lr,
                 loc_coef, max_minutes, layers, rank, blocks, seed, resume, as_json):
    """Meta-train a MALMEN hyper-network for a model on a fact file.

    Shows a progress bar, validates on held-out facts, keeps the best network in OUT (its sha256
    is printed: `knowledger hypernet add OUT` registers it with a workspace) and checkpoints so
    that --resume continues an interrupted run.

    Example: knowledger train-malmen --data ../shared/data/counterfact/counterfact-train.json --out runs/malmen --limit 4200 --max-minutes 40
    """
    from knowledger.agent.bench import load_requests
    from knowledger.agent.editing import open_model
    from knowledger.agent.malmen_train import TrainSettings, check_training_facts, train
    from knowledger.editors.malmen import HyperConfig

    settings = TrainSettings(steps=steps, batch=batch, val_facts=val_facts, val_every=val_every,
                             ckpt_every=ckpt_every, meta_lr=meta_lr, loc_coef=loc_coef,
                             max_minutes=max_minutes, seed=seed, limit=limit)
    requests, skipped = load_requests(Path(data), limit)
    if len(requests) < 2:
        raise click.ClickException(f"{data}: fewer than 2 valid facts")
    check_training_facts(requests)  # target_true and a paraphrase per fact, before the model loads
    lm = open_model(model_name)
    hyper = None if resume else HyperConfig.for_model(lm.model, _layers(layers), rank=rank, n_blocks=blocks)
    data_meta = dict(path=str(Path(data).resolve()), sha256=hashlib.sha256(Path(data).read_bytes()).hexdigest(),
                     facts=len(requests), skipped=skipped)
    summary = train(lm, requests, out, settings, hyper=hyper, resume=resume, data_meta=data_meta,
                    progress=not as_json, log=None if as_json else click.echo)
    if as_json:
        echo_json(summary)
        return
    best = summary["best"]
    click.echo(f"{summary['steps_done']} steps ({summary['stopped']}), {summary['seconds'] / 60:.1f} min; "
               f"{summary['train_facts']} training facts, {summary['val_facts']} held out")
    if best:
        click.echo(f"best at step {best['step']}: efficacy {best['efficacy']:.3f}, paraphrase "
                   f"{best.get('paraphrase', float('nan')):.3f}, neighborhood {best.get('neighborhood', float('nan')):.3f}")
        click.echo(f"hyper-network {best['sha256'][:12]} in {summary['out']}")
