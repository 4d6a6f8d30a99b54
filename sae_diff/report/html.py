"""A self-contained ``report.html`` (no server, no network: plotly.js is inlined once).

Every number comes from the report dictionary (also written as report.json), the KL patching
table or the latent tables behind the figures; figures over seeds are shown as mean ± std with
their min–max.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from sae_diff.analysis.examples import _STYLE as EXAMPLES_STYLE
from sae_diff.analysis.examples import LatentExamples
from sae_diff.atomic import atomic_write
from sae_diff.report.dashboards import render_dashboard
from sae_diff.report.scoring import GRANULARITIES

STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1250px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.finding{margin:.6em 0;padding:.5em .8em;border-left:4px solid #888;background:#fafafa}
.holds-true{border-color:#2a7}.holds-false{border-color:#c55}.holds-mixed{border-color:#d9a400}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.small{color:#666;font-size:12px}
.baseline td:first-child{font-style:italic}
td.ctx{text-align:left;font-family:monospace;white-space:pre-wrap}
.latent-dashboard{border:1px solid #ddd;border-radius:4px;padding:.4em .8em;margin:1em 0}
.sd-row{display:flex;gap:2em;flex-wrap:wrap}.sd-col{flex:1;min-width:320px}
h5{margin:.6em 0 .2em 0}
</style>"""

METHOD_NOTES = {
    "probe": "ceiling: supervised mean-difference probe on x_ft − x_base, 2-fold cross-fitted",
    "mean_diff": "baseline: projection on the mean of x_ft − x_base",
    "pca_diff": "baseline: principal components of x_ft − x_base (both signs)",
    "kl_tokens": "baseline: per-token KL, then the KL dashboard's top token types",
}


def _table(
    df: pd.DataFrame, table_id: str, float_format: str = "{:.3f}", escape: bool = True
) -> str:
    return df.to_html(
        table_id=table_id, na_rep="–", float_format=float_format.format, border=0, escape=escape
    )


def _figure_html(fig: Any, first: bool) -> str:
    return str(fig.to_html(full_html=False, include_plotlyjs=True if first else False))


def _pm(mean: Any, std: Any, lo: Any, hi: Any, n: int, digits: int = 3) -> str:
    if mean is None or isinstance(mean, str) or pd.isna(mean):
        return "–" if mean is None or not isinstance(mean, str) else html.escape(mean)
    if n <= 1 or any(v is None or pd.isna(v) for v in (std, lo, hi)):
        return (
            f"{mean:.{digits}f}"  # one seed, or a figure missing on some seed (first seed's value)
        )
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def _rank(lo: Any, hi: Any) -> str:
    if lo is None or pd.isna(lo):
        return "–"
    return f"{int(lo)}" if lo == hi else f"{int(lo)}–{int(hi)}"


def score_tables(report: Mapping[str, Any]) -> list[str]:
    """One table per granularity: methods (dictionaries, then baselines) × behaviours; each
    cell the best AUROC in the top N (mean ± std [min–max] over seeds), its rank range, and the
    first rank with AUROC ≥ 0.9 (range, and on how many seeds one exists)."""
    summ = pd.DataFrame(report.get("score_summary", []))
    if summ.empty:
        return ["<p>No scores.</p>"]
    behaviours = list(report["organism"]["behaviours"])
    present = list(
        dict.fromkeys(summ["method"])
    )  # dictionaries first, then the ceiling and baselines
    methods = [m for m in present if m not in METHOD_NOTES] + [
        m for m in METHOD_NOTES if m in present
    ]
    out = []
    for gran in GRANULARITIES:
        g = summ[summ["granularity"] == gran]
        head = "".join(f"<th>{html.escape(b)}</th>" for b in behaviours)
        body = []
        for m in methods:
            cells = []
            for b in behaviours:
                r = g[(g["method"] == m) & (g["behaviour"] == b)]
                if r.empty:
                    cells.append("<td>–</td>")
                    continue
                x = r.iloc[0]
                n = int(x["n_seeds"])
                found = int(x["n_found_ge_0_9"])
                first = (
                    f"≥0.9 at rank {_rank(x['first_rank_ge_0_9_min'], x['first_rank_ge_0_9_max'])} "
                    f"({found}/{n} seeds)"
                    if found
                    else f"none ≥0.9 (0/{n})"
                )
                cells.append(
                    f"<td><b>{_pm(x['best_auroc_mean'], x['best_auroc_std'], x['best_auroc_min'], x['best_auroc_max'], n)}</b>"
                    f"<br><span class='small'>rank {_rank(x['rank_min'], x['rank_max'])}; {first}</span></td>"
                )
            cls = " class='baseline'" if m in METHOD_NOTES else ""
            note = (
                f"<br><span class='small'>{html.escape(METHOD_NOTES[m])}</span>"
                if m in METHOD_NOTES
                else ""
            )
            body.append(f"<tr{cls}><td>{html.escape(m)}{note}</td>{''.join(cells)}</tr>")
        out.append(
            f"<h3>Granularity: {gran}</h3><table id='scores-{gran}' class='scores'>"
            f"<tr><th>method</th>{head}</tr>{''.join(body)}</table>"
        )
    return out


def board_table(report: Mapping[str, Any]) -> str:
    """Per-method figures over seeds (mean ± std [min–max])."""
    rows = report.get("scoreboard", [])
    if not rows:
        return ""
    keys = [
        "fve_base",
        "fve_ft",
        "fve_diff",
        "l0",
        "dead_fraction",
        "n_ft_only",
        "n_nu_filtered",
        "kl_closed_reconstruction",
        "kl_closed_error",
        "kl_closed_nu_subset",
        "kl_closed_random",
    ]
    data = {}
    for r in rows:
        n = int(r.get("n_seeds", 1))
        data[r["method"]] = {
            k: _pm(
                r.get(k),
                r.get(f"{k}_std"),
                r.get(f"{k}_min"),
                r.get(f"{k}_max"),
                n,
                digits=1 if k.startswith(("n_", "l0")) else 3,
            )
            for k in keys
        }
    return _table(pd.DataFrame(data), "scoreboard-table")


def write_report_html(
    path: Path,
    report: dict[str, Any],
    examples: Mapping[str, Mapping[int, LatentExamples]],
    kl_table: pd.DataFrame,
    figures: Mapping[str, Any] | None = None,
) -> Path:
    """Render the report (see the module docstring)."""
    org = report["organism"]
    name = org.get("name", "organism")
    kind = org.get("kind", "")
    seeds = report.get("seeds", [])
    label = (
        f"the shipped organism “{name}”" if kind == "shipped" else f"the custom organism “{name}”"
    )
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sae_diff report: {html.escape(name)}</title>"
        f"{STYLE}{EXAMPLES_STYLE}</head><body>",
        f"<h1>sae_diff: the diffing game on {html.escape(label)}</h1>",
        f"<p>Organism <code>{html.escape(str(org.get('path', name)))}</code>: base <b>{html.escape(org['base'])}</b> "
        f"vs fine-tune <b>{html.escape(org['ft'])}</b> at <code>{html.escape(org['hook'])}</code>; "
        f"{report['cache']['tokens']:,} cached tokens; {len(seeds)} training seeds ({', '.join(map(str, seeds))}); "
        f"scoring set: {', '.join(f'{v} {html.escape(k)} rows' for k, v in org.get('rows', {}).items())}, "
        f"{org['scored_tokens']:,} scored tokens. Planted behaviours scored: "
        f"{', '.join(html.escape(b) for b in org['behaviours'])}"
        + (
            f"; skipped: {html.escape(', '.join(f'{b} ({r})' for b, r in org.get('skipped_behaviours', {}).items()))}"
            if org.get("skipped_behaviours")
            else ""
        )
        + f". Total run time {report.get('timings_s', {}).get('total', float('nan')):.0f} s.</p>",
    ]

    parts.append("<h2>Findings of the seed posts, checked on every seed</h2>")
    parts.append(
        "<p class='small'>“Yes” / “No” only when the finding holds / fails on every seed; otherwise "
        "“Mixed”. Figures: mean ± std over seeds (min–max).</p>"
    )
    for f in report.get("findings", []):
        cls = {True: "holds-true", False: "holds-false"}.get(f["holds"], "holds-mixed")
        parts.append(
            f"<div class='finding {cls}'><b>{html.escape(f['question'])}</b><br>{html.escape(f['answer'])}</div>"
        )

    top_n = report.get("config", {}).get("top_n", 50)
    parts.append("<h2 id='scoreboard'>Scoreboard: planted behaviours found, with controls</h2>")
    parts.append(
        f"<p class='small'>Each cell: the best AUROC among the method's top-{top_n} ft-specific candidates "
        "(mean ± std [min–max] over seeds), the rank range of that candidate, and the rank of the first "
        "candidate with AUROC ≥ 0.9. <b>trigger</b>: token level, trigger tokens vs every other scored token; "
        "<b>response</b>: token level, planted-response tokens vs the rest; <b>conversation</b>: the candidate's "
        "maximum over a conversation, conversations carrying the behaviour vs the rest (control conversations "
        "always included). Rankings: crosscoders by Δ ascending; diff-SAE and chat-SAE by |ν_act| ascending; "
        "baselines in their fixed order (docs/evaluation.md). Deterministic baselines have one value.</p>"
    )
    parts += score_tables(report)
    parts.append(
        "<h3>Per-method figures</h3><p class='small'>FVE = fraction of variance explained (per model; the "
        "diff-SAE on the difference, the chat-SAE on ft). kl_closed_*: fraction of the KL gap (stitched → ft) "
        "closed by each patch. Mean ± std [min–max] over seeds.</p>"
    )
    parts.append(board_table(report))

    base = report.get("baselines", {})
    if base:
        parts.append("<h2>Baselines: what the difference direction does</h2>")
        md = base.get("mean_diff", {}).get("logit_lens")
        if md:
            parts.append(
                "<p>Logit lens of the mean activation difference (through the ft unembedding): promotes "
                + ", ".join(f"<code>{html.escape(repr(t)[1:-1])}</code>" for t, _ in md["promoted"])
                + "; suppresses "
                + ", ".join(
                    f"<code>{html.escape(repr(t)[1:-1])}</code>" for t, _ in md["suppressed"]
                )
                + ".</p>"
            )
        pca = base.get("pca_diff", {})
        if pca.get("explained_variance"):
            parts.append(
                "<p>PCA of x_ft − x_base: explained variance of the first components "
                + ", ".join(f"{v:.3f}" for v in pca["explained_variance"][:5])
                + ".</p>"
            )
        kl_c = base.get("kl_tokens", {}).get("candidates")
        if kl_c:
            parts.append(
                "<p>KL candidates in rank order: " + html.escape(", ".join(kl_c)) + ".</p>"
            )

    if figures:
        parts.append("<h2>Plots (first seed)</h2>")
        for i, (title, fig) in enumerate(figures.items()):
            parts.append(f"<h3>{html.escape(title)}</h3>{_figure_html(fig, i == 0)}")

    dash = report.get("kl_dashboard")
    if dash:
        sm = dash["summary"]
        parts.append("<h2>Where the two models diverge (KL dashboard)</h2>")
        parts.append(
            f"<p>Mean KL(p_ft‖p_base) over held-out assistant tokens: all {sm['all']:.3f}, first 10 "
            f"{sm['first']:.3f}, rest {sm['rest']:.3f}. Full dashboard: "
            f"<a href='{html.escape(dash['html'])}'>{html.escape(dash['html'])}</a>. "
            "Context: the preceding tokens, the position in [[ ]].</p>"
        )
        top = pd.DataFrame(dash["top"])
        cols = [
            c
            for c in (
                "seq",
                "pos",
                "token",
                "next_token",
                "kl",
                "nll_base",
                "nll_ft",
                "top_base",
                "top_ft",
            )
            if c in top
        ]
        rows = []
        for r in top.head(15).to_dict("records"):
            cells = "".join(
                f"<td>{r[c]:.3f}</td>"
                if isinstance(r[c], float)
                else f"<td>{html.escape(repr(str(r[c]))[1:-1])}</td>"
                for c in cols
            )
            rows.append(
                f"<tr>{cells}<td class='ctx'>{html.escape(str(r.get('context', '')))}</td></tr>"
            )
        parts.append(
            "<table id='kl-dashboard-table'><tr>"
            + "".join(f"<th>{c}</th>" for c in cols)
            + "<th>context</th></tr>"
            + "".join(rows)
            + "</table>"
        )

    parts.append("<h2>KL patching (first seed)</h2>")
    cols = [
        c
        for c in (
            "dictionary",
            "intervention",
            "n_latents",
            "kl",
            "kl_first",
            "kl_rest",
            "nll",
            "closed",
            "closed_std",
        )
        if c in kl_table.columns
    ]
    parts.append(
        _table(kl_table[cols], "kl-table", "{:.4f}") if cols else "<p>No patchable dictionary.</p>"
    )

    parts.append(
        "<h2 id='dashboards'>Latent dashboards: each method's top candidates (first seed)</h2>"
    )
    parts.append(
        "<p class='small'>Candidates in the method's ranking order. Contexts are decoded by the organism's "
        "tokenizer; the active token is highlighted. Histogram: the latent's non-zero activations on the "
        "held-out scoring set. Logit lens: the ft decoder direction, centred and scaled by the ft final "
        "LayerNorm, through the ft unembedding.</p>"
    )
    for method, rows_ in report.get("top_latents", {}).items():
        parts.append(f"<h3>{html.escape(method)}</h3>")
        ex = examples.get(method, {})
        for info in rows_:
            parts.append(render_dashboard(method, info, ex.get(int(info["latent"]))))

    parts.append("</body></html>")
    page = "\n".join(parts)
    atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path
