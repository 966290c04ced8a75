"""`knowledger edit`: a direct, one-shot edit of given facts, for people who just want an edited model."""
from __future__ import annotations

import json

import click

from knowledger.agent.scheduler import EDITORS

from .common import echo_json, main_errors
from .main import cli


def parse_sets(pairs: tuple[str, ...]) -> dict:
    """--set key=value pairs -> hyperparameter overrides (values parsed as JSON when they parse)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _tokens(toks) -> str:
    """[(token, probability)] -> "' Rome' 0.53, ' Paris' 0.08"."""
    return ", ".join(f"{t!r} {q:.2f}" for t, q in toks)


def hparam_options(f):
    f = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a hyperparameter, e.g. --set v_steps=10 --set layers=[3,4].")(f)
    f = click.option("--preset", help="Hyperparameter preset name (default: the model family's).")(f)
    f = click.option("--stats-tokens", type=click.IntRange(1000), help="Corpus tokens for key statistics.")(f)
    f = click.option("--corpus", type=click.Path(exists=True, dir_okay=False),
                     help="Text or JSONL corpus for key statistics [default: text sampled from the model].")(f)
    f = click.option("--model", "model_name", help="Model name or path [default: SmolLM2-135M-Instruct].")(f)
    f = click.option("--hypernet", type=click.Path(exists=True, file_okay=False),
                     help="A MALMEN hyper-network folder (from train-malmen), for --editor malmen.")(f)
    return f


@cli.command()
@hparam_options
@click.option("--editor", type=click.Choice(EDITORS), default="emmet", show_default=True)
@click.option("--prompt", help='Prompt with "{}" for the subject (or containing the subject).')
@click.option("--subject")
@click.option("--target", help="The new target (target_new).")
@click.option("--target-true", help="The current answer, for the before/after comparison.")
@click.option("--paraphrase", "paraphrases", multiple=True, help="A paraphrase prompt to check (repeatable).")
@click.option("--neighbor", "neighbors", multiple=True, metavar="PROMPT=ANSWER",
              help="An unrelated prompt that must keep its answer (repeatable).")
@click.option("--file", "fact_file", type=click.Path(exists=True, dir_okay=False),
              help="Facts from a .jsonl/.csv/.json file instead of the options.")
@click.option("--out", type=click.Path(file_okay=False), help="Save the edited model here (HF folder).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@main_errors
def edit(model_name, hypernet, corpus, stats_tokens, preset, sets, editor, prompt, subject, target, target_true,
         paraphrases, neighbors, fact_file, out, as_json):
    """Edit facts directly into a model (no ledger) and show top next tokens before and after.

    Example: knowledger edit --prompt "{} is located in the city of" --subject "The Eiffel Tower" --target Rome --target-true Paris --out edited/
    """
    from knowledger.agent.editing import (direct_edit, open_model, requests_from_facts,
                                          resolve_hparams, save_model)
    from knowledger.ledger.facts import parse_neighbor, read_facts, validate_fact

    if fact_file:
        rows = read_facts(fact_file)
        bad = [r for r in rows if not r.ok]
        if bad:
            raise click.ClickException(f"{fact_file}:{bad[0].line}: {bad[0].error}")
        facts = [r.fact for r in rows]
    else:
        if not (prompt and subject and target):
            raise click.UsageError("give --prompt, --subject and --target, or --file")
        facts = [validate_fact(prompt, subject, target, target_true, paraphrases,
                               [parse_neighbor(n) for n in neighbors])]
    overrides = parse_sets(sets)
    if stats_tokens:
        overrides["stats_tokens"] = stats_tokens
    lm = open_model(model_name)
    hp = resolve_hparams(lm, preset, overrides)
    report = direct_edit(lm, requests_from_facts(facts), method=editor, hp=hp, corpus=corpus,
                         progress=not as_json, hypernet=hypernet)
    if out:
        report["saved_to"] = str(save_model(lm, out))
    if as_json:
        echo_json(report)
        return
    for fact in report["facts"]:
        click.echo(f"{fact['prompt']!r} -> {fact['target_new']!r}")
        for p in fact["before"]:
            click.echo(f"  {p}")
            click.echo(f"    before: {_tokens(fact['before'][p])}")
            click.echo(f"    after:  {_tokens(fact['after'][p])}")
    t = report["timings"]
    if editor == "malmen":
        click.echo(f"malmen on layers {report['layers']}: gradients {t.get('cache_s', 0):.2f}s, hyper-network "
                   f"{t.get('hypernet_s', 0):.2f}s, solve {t.get('solve_s', 0):.2f}s")
    else:
        click.echo(f"{editor} on layers {report['layers']}: v* {t.get('values_s', 0):.2f}s, keys "
                   f"{t.get('keys_s', 0):.2f}s, solve {t.get('solve_s', 0):.2f}s (statistics {report['stats_s']:.1f}s)")
    if out:
        click.echo(f"saved the edited model to {report['saved_to']}")
