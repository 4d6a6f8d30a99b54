"""A self-contained ``report.html`` (no server, no network: plotly.js is inlined once)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from sae_diff.dictionaries.io import atomic_write_bytes

STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.finding{margin:.6em 0;padding:.5em .8em;border-left:4px solid #888;background:#fafafa}
.holds-true{border-color:#2a7}.holds-false{border-color:#c55}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.small{color:#666;font-size:12px}
</style>"""


def _table(df: pd.DataFrame, table_id: str, float_format: str = "{:.3f}") -> str:
    return df.to_html(table_id=table_id, na_rep="–", float_format=float_format.format, border=0, escape=True)


def _figure_html(fig: Any, first: bool) -> str:
    return str(fig.to_html(full_html=False, include_plotlyjs=True if first else False))


def write_report_html(path: Path, report: dict[str, Any], examples: Mapping[str, Mapping[int, Any]],
                      kl_table: pd.DataFrame, figures: Mapping[str, Any] | None = None) -> Path:
    """Render the report: every number comes from ``report`` (also written as report.json),
    the KL table (kl_patching.csv), or the latent tables behind the ``figures``."""
    org = report["organism"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sae_diff demo report</title>{STYLE}</head><body>",
             "<h1>sae_diff: the diffing game on the bundled organism</h1>",
             f"<p>Base <b>{html.escape(org['base'])}</b> vs fine-tune <b>{html.escape(org['ft'])}</b> at "
             f"<code>{html.escape(org['hook'])}</code>; {report['cache']['tokens']:,} cached tokens; "
             f"{org['scored_tokens']:,} held-out tokens scored. Total run time "
             f"{report.get('timings_s', {}).get('total', float('nan')):.0f} s.</p>"]

    parts.append("<h2>Findings of the seed posts, checked</h2>")
    for f in report.get("findings", []):
        cls = {True: "holds-true", False: "holds-false"}.get(f["holds"], "")
        parts.append(f"<div class='finding {cls}'><b>{html.escape(f['question'])}</b><br>{html.escape(f['answer'])}</div>")

    parts.append("<h2 id='scoreboard'>Scoreboard</h2>")
    parts.append("<p class='small'>FVE = fraction of variance explained (per model; the diff-SAE on the difference, "
                 "the chat-SAE on ft). AUROC: best single latent among the method's top-50 ft-specific candidates "
                 "against the behaviour's token labels; rank = that latent's position in the ranking. kl_closed_*: "
                 "fraction of the KL gap (stitched → ft) closed by each patch.</p>")
    board = pd.DataFrame(report["scoreboard"]).set_index("method")
    parts.append(_table(board.T, "scoreboard-table"))

    if figures:
        parts.append("<h2>Plots</h2>")
        for i, (title, fig) in enumerate(figures.items()):
            parts.append(f"<h3>{html.escape(title)}</h3>{_figure_html(fig, i == 0)}")

    dash = report.get("kl_dashboard")
    if dash:
        sm = dash["summary"]
        parts.append("<h2>Where the two models diverge (KL dashboard)</h2>")
        parts.append(f"<p>Mean KL(p_ft‖p_base) over held-out assistant tokens: all {sm['all']:.3f}, first 10 "
                     f"{sm['first']:.3f}, rest {sm['rest']:.3f}. Full dashboard with contexts: "
                     f"<a href='{html.escape(dash['html'])}'>{html.escape(dash['html'])}</a>.</p>")
        top = pd.DataFrame(dash["top"])
        cols = [c for c in ("seq", "pos", "token", "next_token", "kl", "nll_base", "nll_ft", "top_base", "top_ft") if c in top]
        parts.append(_table(top[cols].head(10), "kl-dashboard-table"))

    parts.append("<h2>KL patching</h2>")
    cols = [c for c in ("dictionary", "intervention", "n_latents", "kl", "kl_first", "kl_rest", "nll", "closed", "closed_std")
            if c in kl_table.columns]
    parts.append(_table(kl_table[cols], "kl-table", "{:.4f}"))

    parts.append("<h2>Top ft-specific latents, with max-activating examples</h2>")
    for method, ex in examples.items():
        parts.append(f"<h3>{html.escape(method)}</h3>")
        info_by_latent = {r["latent"]: r for r in report.get("top_latents", {}).get(method, [])}
        for latent, le in ex.items():
            r = info_by_latent.get(int(latent), {})
            info = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in r.items() if k not in ("latent", "matched_behaviour", "auroc")]
            if "matched_behaviour" in r:
                info.append(f"matched behaviour: <b>{html.escape(r['matched_behaviour'])}</b> (AUROC {r['auroc']:.3f})")
            parts.append(f"<p>latent {latent}: {', '.join(info)}</p>{le.to_html()}")

    parts.append("</body></html>")
    page = "\n".join(parts)
    atomic_write_bytes(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path
