"""Max-activating examples as records, text and HTML.

:class:`Example` (one active token in its context) and :class:`LatentExamples` (a latent's top
and quantile examples) are what :func:`sae_diff.analysis.examples.max_activating_examples`
returns; their ``to_text`` / ``to_html`` and :func:`examples_html` render them (the report
embeds the same HTML and ``STYLE``). Kept apart from the streaming pass so that readers of
examples (report, dashboards) need not import it.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sae_diff.atomic import atomic_write

__all__ = ["STYLE", "Example", "LatentExamples", "examples_html", "save_examples_html"]


#: the CSS of the examples' HTML (also embedded by the report)
STYLE = """<style>
.sd-ex { font-family: monospace; white-space: pre-wrap; margin: 2px 0; }
.sd-val { color: #666; display: inline-block; min-width: 5em; }
.sd-act { font-weight: bold; border-radius: 3px; }
.sd-latent h3 { margin-bottom: 0.2em; }
</style>"""


def _visible(tok: str) -> str:
    return tok.replace("\n", "↵").replace("\t", "⇥")


@dataclass
class Example:
    """One active token in context. ``tokens[active]`` is the active token."""

    latent: int
    value: float
    seq: int
    pos: int
    tokens: list[str]
    active: int

    def to_text(self, mark: tuple[str, str] = ("«", "»")) -> str:
        """One line: the context with the active token wrapped in ``mark`` and the value."""
        parts = [_visible(t) for t in self.tokens]
        parts[self.active] = f"{mark[0]}{parts[self.active]}{mark[1]}"
        return f"{self.value:8.3f}  {''.join(parts)}"

    def to_html(self, max_value: float | None = None) -> str:
        """A ``<div>`` with the active token highlighted (opacity ∝ value / ``max_value``)."""
        scale = self.value / max_value if max_value else 1.0
        alpha = 0.25 + 0.75 * min(max(scale, 0.0), 1.0)
        spans = []
        for n, tok in enumerate(self.tokens):
            text = html.escape(_visible(tok))
            if n == self.active:
                bare = _visible(tok).lstrip(" ")  # the decoder's leading space stays unhighlighted
                lead = " " * (len(_visible(tok)) - len(bare))
                spans.append(
                    f'{lead}<span class="sd-act" style="background:rgba(255,120,0,{alpha:.2f})" '
                    f'title="latent {self.latent}: {self.value:.4g} (seq {self.seq}, pos {self.pos})">'
                    f"{html.escape(bare)}</span>"
                )
            else:
                spans.append(f"<span>{text}</span>")
        return (
            f'<div class="sd-ex"><span class="sd-val">{self.value:.3f}</span> '
            f'<span class="sd-ctx">{"".join(spans)}</span></div>'
        )


@dataclass
class LatentExamples:
    """Top and quantile examples of one latent."""

    latent: int
    count_active: int
    n_tokens: int
    top: list[Example] = field(default_factory=list)
    quantiles: list[tuple[float, float, list[Example]]] = field(default_factory=list)

    @property
    def freq(self) -> float:
        return self.count_active / self.n_tokens if self.n_tokens else float("nan")

    def to_text(self) -> str:
        lines = [
            f"latent {self.latent}: active on {self.count_active} of {self.n_tokens} tokens "
            f"(freq {self.freq:.2e})",
            "  top:",
        ]
        lines += [f"    {ex.to_text()}" for ex in self.top]
        for lo, hi, exs in self.quantiles:
            lines.append(f"  quantile [{lo:.3f}, {hi:.3f}]:")
            lines += [f"    {ex.to_text()}" for ex in exs]
        return "\n".join(lines)

    def to_html(self) -> str:
        vmax = self.top[0].value if self.top else None
        out = [
            f'<div class="sd-latent"><h3>Latent {self.latent}</h3>'
            f"<p>active on {self.count_active} of {self.n_tokens} tokens (freq {self.freq:.2e})</p>",
            "<h4>Top activations</h4>",
        ]
        out += [ex.to_html(vmax) for ex in self.top]
        for lo, hi, exs in self.quantiles:
            out.append(f"<h4>Activations in [{lo:.3f}, {hi:.3f}]</h4>")
            out += [ex.to_html(vmax) for ex in exs]
        out.append("</div>")
        return "\n".join(out)

    def _repr_html_(self) -> str:
        return STYLE + self.to_html()

    def __str__(self) -> str:
        return self.to_text()


def examples_html(
    examples: Mapping[int, LatentExamples] | Iterable[LatentExamples],
    title: str = "Max-activating examples",
) -> str:
    """A standalone HTML page with every latent's examples."""
    items = examples.values() if isinstance(examples, Mapping) else examples
    body = "\n".join(e.to_html() for e in items)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"{STYLE}</head><body><h2>{html.escape(title)}</h2>\n{body}\n</body></html>"
    )


def save_examples_html(
    examples: Mapping[int, LatentExamples] | Iterable[LatentExamples],
    path: str | Path,
    title: str = "Max-activating examples",
) -> Path:
    """Write :func:`examples_html` to ``path`` (atomically); returns the path."""
    path = Path(path)
    page = examples_html(examples, title)
    atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path
