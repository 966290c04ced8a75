"""`knowledger bench`: CounterFact / zsRE benchmarks as programs with outputs (JSON + Markdown)."""
from __future__ import annotations

import sys

import click

from knowledger.agent.scheduler import batch_limit
from knowledger.cli.common import device_option, echo_json, progress
from knowledger.cli.direct import EDITORS, hparam_options, parse_sets
from knowledger.cli.main import cli


@cli.group()
def bench():
    """Benchmarks: edit facts from a dataset and measure quality, speed and memory.

    Example: knowledger bench counterfact --data ../shared/data/counterfact/counterfact-val.json --n 100 --batch-size 10 --editor emmet --out results.json
    """


def _bench_command(dataset: str):
    @bench.command(name=dataset, help=(
        f"Edit --n facts of a {dataset} file in batches (lifelong protocol) and measure.\n\n"
        f"Example: knowledger bench {dataset} --data FILE --n 100 --batch-size 10 --editor memit "
        f"--out results.json"))
    @hparam_options
    @click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
                  help="Dataset file (CounterFact EasyEdit/ROME layout, zsRE MEND layout, or ours).")
    @click.option("--n", "n", type=click.IntRange(1), default=100, show_default=True, help="Facts to edit.")
    @click.option("--offset", type=click.IntRange(0), default=0, help="Skip this many valid facts first.")
    @click.option("--batch-size", type=click.IntRange(1), default=10, show_default=True)
    @click.option("--editor", type=click.Choice(("auto",) + EDITORS + ("none",)), default="emmet",
                  show_default=True, help="'none' measures the unedited model (the baseline row); "
                  "'auto' picks per batch as the scheduler would.")
    @click.option("--sequential/--independent", default=True, show_default=True,
                  help="Batches pile up on the same weights (lifelong), or each starts from the unedited model.")
    @click.option("--curve-points", type=click.IntRange(1), default=10, show_default=True,
                  help="How often (about) all facts edited so far are re-evaluated, with perplexity and norms.")
    @click.option("--heldout-tokens", type=click.IntRange(0), default=8192, show_default=True,
                  help="Held-out corpus tokens for perplexity (after the statistics' tokens); 0 skips it.")
    @click.option("--out", type=click.Path(dir_okay=False), help="Write the run's JSON here.")
    @device_option
    @click.option("--json", "as_json", is_flag=True, help="Print the JSON instead of the table.")
    def command(model_name, hypernet, corpus, stats_tokens, preset, sets, data, n, offset, batch_size, editor,
                sequential, curve_points, heldout_tokens, out, device, as_json):
        from knowledger.agent.bench import benchmark
        from knowledger.agent.plots import markdown_table

        if (limit := batch_limit(editor)) and batch_size > limit:
            raise click.BadParameter(f"{editor} edits at most {limit} fact(s) at a time: use "
                                     f"--batch-size {limit}", param_hint="--batch-size")
        record = benchmark(dataset, data, n=n, offset=offset, model=model_name, editor=editor,
                           batch_size=batch_size, preset=preset, overrides=parse_sets(sets),
                           stats_tokens=stats_tokens, corpus=corpus, hypernet=hypernet,
                           sequential=sequential, curve_points=curve_points,
                           heldout_tokens=heldout_tokens, out=out, device=device, progress=progress(),
                           command="knowledger " + " ".join(sys.argv[1:]) if sys.argv else None)
        if as_json:
            echo_json(record)
        else:
            click.echo(markdown_table([record]))

    return command


counterfact = _bench_command("counterfact")
zsre = _bench_command("zsre")


@bench.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--md", type=click.Path(dir_okay=False), help="Write the Markdown table here.")
@click.option("--png", type=click.Path(dir_okay=False), help="Write a bar chart of the metrics here.")
@click.option("--curves", type=click.Path(dir_okay=False),
              help="Write the lifelong curves (metrics, perplexity, norm growth vs edits) here.")
def table(results, md, png, curves):
    """Combine benchmark JSON files into one Markdown table (and a PNG chart).

    Example: knowledger bench table bench/results/*.json --md bench/results/table.md --png bench/results/metrics.png
    """
    from knowledger.agent.plots import combine

    result = combine(results, md=md, png=png, curves=curves)
    if curves and result.curves is None:
        click.echo("no run has curves (sequential runs record them)", err=True)
    click.echo(result.table)
