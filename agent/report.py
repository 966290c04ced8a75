"""`knowledger report`: one self-contained HTML page of the edits and audits over the operations.

Charts (matplotlib, Agg backend, PNGs embedded as base64 data URIs, so the page is one file that
can be mailed or archived), each with the head seq of the audited weights on the x axis:
- edit success: the share of active facts whose target_new is still top-1 in each audit (and the
  paraphrase / neighbourhood top-1 rates), with each operation's own rate right after it was
  applied as markers;
- drift: active and drifted facts per audit;
- perplexity on the held-out text: the live model and the base model (and the danger line);
- weight change: ‖W − W_base‖_F / ‖W_base‖_F per edited layer (and the danger line).
Below them: the latest audit's drifted facts and dangers, and a table of every audit run.
"""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from knowledger.agent.audit import runs_view
from knowledger.agent.workspace import Workspace, iso
from knowledger.editors.fileio import atomic_write_text, check_inside
from knowledger.ledger import repository as repo
from knowledger.ledger.models import OperationStatus, utcnow


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _charts(runs: list[dict], ops: list[dict]) -> dict[str, str]:
    """{title: base64 PNG}; a chart without data is left out."""
    from matplotlib.ticker import MaxNLocator

    from knowledger.agent.plots import pyplot

    plt = pyplot()

    out = {}
    done = [r for r in runs if r["status"] == "completed"]
    x = [r["head_seq"] for r in done]
    m = [r["metrics"] for r in done]

    def new(title, ylabel):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.set_title(title)
        ax.set_xlabel("operation seq (ledger head)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return fig, ax

    def finish(name, fig, ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        out[name] = _png(fig)
        plt.close(fig)

    applied = [(o["seq"], o["efficacy_acc"]) for o in ops if o["efficacy_acc"] is not None]
    if done or applied:
        fig, ax = new("Edit success", "share of facts, top-1")
        if done:
            ax.plot(x, [v.get("success_rate") for v in m], "o-", label="rewrite (audit)")
            for key, label in (("paraphrase_acc", "paraphrase (audit)"),
                               ("neighborhood_acc", "neighbourhood kept (audit)")):
                ys = [(v.get("aggregate") or {}).get(key) for v in m]
                if any(y is not None for y in ys):
                    ax.plot(x, ys, "s--", label=label, alpha=0.8)
        if applied:
            ax.scatter(*zip(*applied), marker="x", color="gray", label="rewrite, right after each operation")
        ax.set_ylim(-0.05, 1.05)
        finish("success", fig, ax)
    if done:
        fig, ax = new("Drift", "facts")
        ax.plot(x, [v.get("facts", 0) for v in m], "o-", label="active facts")
        ax.bar(x, [v.get("drifted", 0) for v in m], width=0.4, color="tab:red", label="drifted")
        finish("drift", fig, ax)
        health = [(xi, v.get("health") or {}) for xi, v in zip(x, m)]
        ppl = [(xi, h["perplexity"], h["base_perplexity"]) for xi, h in health if h.get("perplexity")]
        if ppl:
            fig, ax = new("Held-out perplexity", "perplexity")
            xs, ys, bs = zip(*ppl)
            ax.plot(xs, ys, "o-", label="live model")
            ax.plot(xs, bs, "k:", label="base model")
            ratio = m[-1].get("thresholds", {}).get("ppl_ratio")
            if ratio:
                ax.plot(xs, [b * ratio for b in bs], "r--", lw=0.8, label=f"danger (×{ratio:g})")
            finish("perplexity", fig, ax)
        layers = sorted({k for _, h in health for k in h.get("layers", {})}, key=int)
        if layers:
            fig, ax = new("Weight change of the edited layers", "||W - W_base|| / ||W_base||")
            for k in layers:
                pts = [(xi, h["layers"][k]["delta_rel"]) for xi, h in health if k in h.get("layers", {})]
                ax.plot(*zip(*pts), "o-", label=f"layer {k}")
            limit = m[-1].get("thresholds", {}).get("norm_ratio")
            if limit:
                ax.axhline(limit, color="r", ls="--", lw=0.8, label=f"danger ({limit:g})")
            finish("norms", fig, ax)
    return out


def _operations(ws: Workspace) -> list[dict]:
    with ws.reading() as s:
        base = repo.current_base_model(s)
        if base is None:
            return []
        return [dict(seq=op.seq, kind=op.kind.value,
                     efficacy_acc=((op.metrics_json or {}).get("after") or {}).get("efficacy_acc"))
                for op in repo.lineage(s, base.id) if op.status == OperationStatus.committed]


_CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l{text-align:left}.bad{color:#b00}.ok{color:#070}img{max-width:100%}"""


def _num(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


# the page: a jinja2 template, autoescaped (every text from the ledger is HTML-escaped)
_PAGE = """<!doctype html><html><head><meta charset='utf-8'><title>knowledger report</title>
<style>{{ css | safe }}</style></head><body><h1>knowledger: edits and audits</h1>
<p>Workspace <code>{{ where }}</code>; base model <code>{{ base }}</code>; {{ n_ops }} committed operations; \
facts: {{ counts }}. Generated {{ now }}.</p>
{% if last %}
<h2>Latest audit (#{{ last.id }}, seq {{ last.head_seq }}, {{ last.finished_at or '' }})</h2>\
<p>{{ lm.facts or 0 }} active facts, {{ lm.drifted or 0 }} drifted: {% if lm.healthy %}\
<span class='ok'>healthy</span>{% else %}<span class='bad'>drift or danger found</span>{% endif %}.</p>
{% if lm.danger %}<ul>{% for d in lm.danger %}<li class='bad'>{{ d }}</li>{% endfor %}</ul>{% endif %}
{% if drifted %}
<table><tr><th>fact</th><th>prompt</th><th>target_new</th><th>P(new)</th><th>rank</th><th>margin drop</th><th>why</th></tr>
{% for r in drifted %}<tr><td>#{{ r.id }}</td><td class='l'>{{ r.text }}</td><td class='l'>{{ r.target }}</td>\
<td>{{ num(r.p_new) }}</td><td>{{ num(r.rank, '.0f') }}</td><td>{{ num(r.margin_drop, '.2f') }}</td>\
<td class='l'>{{ r.why }}</td></tr>
{% endfor %}</table>
{% endif %}
{% else %}
<p>No audits yet: run <code>knowledger audit</code>.</p>
{% endif %}
{% for name, png in charts.items() %}<h2>{{ titles.get(name, name) }}</h2>\
<img alt='{{ name }}' src='data:image/png;base64,{{ png }}'>
{% endfor %}
{% if runs %}
<h2>Audit runs</h2><table><tr><th>#</th><th>finished</th><th>head seq</th><th>device</th><th>status</th>\
<th>facts</th><th>drifted</th><th>top-1</th><th>ppl ratio</th><th>max ΔW/W</th></tr>
{% for r in runs %}<tr><td>{{ r.id }}</td><td class='l'>{{ r.finished_at or '' }}</td><td>{{ r.head_seq }}</td>\
<td>{{ r.device or '' }}</td><td>{{ r.status }}</td><td>{{ r.metrics.get('facts', '-') }}</td>\
<td>{{ r.metrics.get('drifted', '-') }}</td><td>{{ num(r.metrics.get('success_rate')) }}</td>\
<td>{{ num(r.ppl_ratio) }}</td><td>{{ num(r.max_rel) }}</td></tr>
{% endfor %}</table>
{% endif %}
</body></html>
"""


def _page(ws: Workspace, runs: list[dict], ops: list[dict], charts: dict[str, str]) -> str:
    from jinja2 import Environment

    with ws.reading() as s:
        base = repo.current_base_model(s)
        counts = repo.count_requests_by_status(s)
    done = [r for r in runs if r["status"] == "completed"]
    last = done[-1] if done else None
    drifted = []
    if last is not None:
        with ws.reading() as s:
            found = [(r.request_id, r.metrics_json or {}) for r in repo.audit_results(s, last["id"], drifted=True)]
            texts = {q.id: q for q in repo.requests_by_ids(s, [i for i, _ in found])} if found else {}
            for i, mj in found:
                mm = mj.get("metrics") or {}
                drifted.append(dict(id=i, text=texts[i].prompt.format(texts[i].subject), target=texts[i].target_new,
                                    p_new=mm.get("rewrite_p_new"), rank=mm.get("rewrite_rank"),
                                    margin_drop=mj.get("margin_drop"), why="; ".join(mj.get("reasons") or [])))
    table = []
    for r in runs:
        h = r["metrics"].get("health") or {}
        rel = [v["delta_rel"] for v in (h.get("layers") or {}).values()]
        table.append(dict(r, ppl_ratio=h.get("ppl_ratio"), max_rel=max(rel) if rel else None))
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(_PAGE).render(
        css=_CSS, where=str(ws.location.where), base=base.name_or_path if base else "-", n_ops=len(ops),
        counts=", ".join(f"{v} {k}" for k, v in counts.items() if v), now=iso(utcnow()), last=last,
        lm=(last or {}).get("metrics") or {}, drifted=drifted, charts=charts, runs=table, num=_num,
        titles=dict(success="Edit success", drift="Drift", perplexity="Perplexity", norms="Weight change"))


def write_report(ws: Workspace, out: str | os.PathLike | None = None) -> dict:
    """Write `<out>/index.html` (default `<workspace home>/report/`), atomically."""
    folder = Path(out).expanduser().resolve() if out else ws.location.home / "report"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a directory")
    runs, ops = runs_view(ws), _operations(ws)
    charts = _charts(runs, ops)
    page = _page(ws, runs, ops, charts)
    if not out:
        check_inside(folder, ws.location.home)  # no symlink in the workspace redirects it
    atomic_write_text(folder / "index.html", page)  # 0644, never through a symlink
    return dict(path=str(folder / "index.html"), audits=len(runs), operations=len(ops), charts=list(charts))

