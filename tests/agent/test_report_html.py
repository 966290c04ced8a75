"""The report page is a jinja2 template with autoescape: ledger text never becomes markup."""
from knowledger.agent.report import _page
from knowledger.agent.workspace import open_workspace


def test_the_page_escapes_ledger_text_and_shows_the_runs(ws):
    run = dict(id=7, status="completed", head_seq=3, finished_at="2026-12-02T16:00:00Z", device="cpu<b>",
               metrics=dict(facts=2, drifted=0, healthy=False, danger=["<script>alert(1)</script>"],
                            success_rate=0.5, health=dict(ppl_ratio=1.25, layers={"1": dict(delta_rel=0.125)})))
    with open_workspace(ws) as w:
        page = _page(w, [run], [], {"norms": "iVBORw0KGgo"})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "cpu&lt;b&gt;" in page
    assert "<h2>Latest audit (#7, seq 3, 2026-12-02T16:00:00Z)</h2>" in page
    assert "<span class='bad'>drift or danger found</span>" in page
    assert "<td>0.500</td><td>1.250</td><td>0.125</td>" in page
    assert "<h2>Weight change</h2><img alt='norms' src='data:image/png;base64,iVBORw0KGgo'>" in page
    with open_workspace(ws) as w:
        assert "No audits yet" in _page(w, [], [], {})
