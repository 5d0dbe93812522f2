"""The self-contained HTML head report of ``lens-eval --report``, and the heatmaps it shows.

The page embeds its plots as base64 PNG data URIs and its style inline, so it opens offline from a
single file: it references no script, font, stylesheet or image outside itself.
"""

import base64
import html
import io
import logging
import math
from collections import defaultdict
from pathlib import Path

from train.evaluate import BASELINE, Evaluation, HeadMetrics, HeadTopTokens, ModelReference, TokenShare, lens_order

logger = logging.getLogger(__name__)

Grid = dict[tuple[int, int], float]  # (layer, head) -> value

# Heatmaps with at most this many cells per panel print each cell's value.
ANNOTATE_MAX_CELLS = 64
# Width in inches beyond which heatmap panels wrap onto another row, so that text stays legible on a page.
MAX_FIGURE_WIDTH = 14.0

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #eee; } td.text, th.text { text-align: left; }
code, .token { font-family: monospace; white-space: pre; }
img { max-width: 100%; display: block; margin: 8px 0; }
p.note { color: #555; font-size: 0.9em; max-width: 60em; }
"""


def metric_panels(rows: list[HeadMetrics], metric: str) -> dict[str, Grid]:
    """Collect one grid of ``metric`` per lens, in display order."""
    panels: dict[str, Grid] = {name: {} for name in lens_order(rows)}
    for row in rows:
        value = getattr(row, metric)
        if value is not None:
            panels[row.lens][(row.layer, row.head)] = value
    return panels


def difference_panels(rows: list[HeadMetrics], metric: str = "kl_nats") -> dict[str, Grid]:
    """Subtract the DLA baseline's ``metric`` from each trained lens's, per layer and head.

    Lenses on layers without a baseline row are left out.
    """
    baseline = {(row.layer, row.head): getattr(row, metric) for row in rows if row.lens == BASELINE}
    panels: dict[str, Grid] = defaultdict(dict)
    for row in rows:
        key = (row.layer, row.head)
        if row.lens != BASELINE and key in baseline:
            panels[row.lens][key] = getattr(row, metric) - baseline[key]
    return {name: panels[name] for name in lens_order(rows) if name in panels}


def heatmap_figure(rows: list[HeadMetrics], metric: str, label: str):
    """Draw ``metric`` as layers x heads heatmaps, one panel per lens, on one colour scale from 0."""
    panels = metric_panels(rows, metric)
    values = [value for grid in panels.values() for value in grid.values()]
    vmax = max(values, default=1.0) if metric != "top1_agreement" else 1.0
    return panels_figure(panels, label, cmap="viridis", vmin=0.0, vmax=vmax or 1.0)


def difference_figure(rows: list[HeadMetrics]):
    """Draw lens KL minus DLA KL per head, blue where the lens is closer to the model.

    Returns None when no lens has a baseline on its layer.
    """
    panels = difference_panels(rows)
    if not panels:
        return None
    largest = max((abs(value) for grid in panels.values() for value in grid.values()), default=0.0)
    largest = largest or 1.0
    return panels_figure(panels, f"KL (nats) minus {BASELINE}", cmap="RdBu_r", vmin=-largest, vmax=largest)


def panels_figure(panels: dict[str, Grid], label: str, *, cmap: str, vmin: float, vmax: float):
    """Draw each grid as a layers x heads heatmap; cells absent from a panel are grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = [key for grid in panels.values() for key in grid]
    layers = sorted({layer for layer, _ in cells})
    n_heads = max(head for _, head in cells) + 1
    colormap = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
    panel_width, panel_height = 2.4 + 0.5 * n_heads, 1.8 + 0.4 * len(layers)  # inches
    columns = max(1, min(len(panels), int(MAX_FIGURE_WIDTH // panel_width)))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, squeeze=False, figsize=(panel_width * columns, panel_height * rows))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, grid) in zip(axes.flat, panels.items()):
        values = np.full((len(layers), n_heads), np.nan)  # [layer, head]
        for (layer, head), value in grid.items():
            values[layers.index(layer), head] = value
        image = ax.imshow(values, cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto")
        if values.size <= ANNOTATE_MAX_CELLS:
            _annotate(ax, values, image)
        ax.set_title(f"{name}: {label}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def _annotate(ax, values, image) -> None:
    """Print each cell's value in a colour that stays readable on the cell."""
    for (row, column), value in _iter_cells(values):
        if math.isnan(value):
            continue
        red, green, blue, _ = image.cmap(image.norm(value))
        colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        ax.text(column, row, f"{value:.2g}", ha="center", va="center", fontsize=7, color=colour)


def _iter_cells(values):
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            yield (row, column), float(values[row, column])


def figure_png(fig, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it.

    The PNG carries no ``Software`` text chunk, which would hold matplotlib's web address.
    """
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    return f"{value:.{digits}f}"


def _token(text: str) -> str:
    return f'<span class="token">{html.escape(repr(text))}</span>'


def _shares(tokens: list[TokenShare]) -> str:
    return ", ".join(f"{_token(share.token)} {share.share:.0%}" for share in tokens) or "&ndash;"


def _table(header: list[str], body: list[list[str]], text_columns: frozenset[int] = frozenset({0})) -> str:
    """Build an HTML table. Cells in ``text_columns`` are left-aligned and the others (numbers) right-aligned."""
    def cells(tag: str, values: list[str]) -> str:
        return "".join(f'<{tag} class="text">{v}</{tag}>' if i in text_columns else f"<{tag}>{v}</{tag}>"
                       for i, v in enumerate(values))

    rows = "".join(f"<tr>{cells('td', values)}</tr>" for values in body)
    return f"<table><tr>{cells('th', header)}</tr>{rows}</table>"


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _model_references(evaluation: Evaluation) -> list[tuple[str, ModelReference]]:
    """Pair the model's own numbers with a layer label, merged into one "all" row when every layer has the same."""
    references = evaluation.model
    first = references[0] if references else None
    if first is not None and all(ref.ce_nats == first.ce_nats and ref.top_tokens == first.top_tokens
                                 for ref in references):
        return [("all" if len(references) > 1 else str(first.layer), first)]
    return [(str(ref.layer), ref) for ref in references]


def summary_section(evaluation: Evaluation) -> str:
    """Build a table of mean metrics per layer and lens, with the model's own cross-entropy."""
    groups: dict[tuple[int, str], list[HeadMetrics]] = defaultdict(list)
    for row in evaluation.rows:
        groups[(row.layer, row.lens)].append(row)
    order = {name: index for index, name in enumerate(lens_order(evaluation.rows))}
    baseline = {(row.layer, row.head): row.kl_nats for row in evaluation.rows if row.lens == BASELINE}
    body = []
    for (layer, name), group in sorted(groups.items(), key=lambda item: (item[0][0], order[item[0][1]])):
        below = "&ndash;"
        if name != BASELINE and all((layer, row.head) in baseline for row in group):
            below = f"{sum(row.kl_nats < baseline[(layer, row.head)] for row in group)}/{len(group)}"
        body.append([html.escape(name), str(layer), _number(_mean([r.kl_nats for r in group])),
                     _number(_mean([r.kl_bits_per_byte for r in group]), 4), _number(_mean([r.ce_nats for r in group])),
                     _number(_mean([r.ce_bits_per_byte for r in group]), 4),
                     f"{_mean([r.top1_agreement for r in group]):.1%}", below])
    for layer, reference in _model_references(evaluation):
        body.append(["model itself", layer, "0", "0", _number(reference.ce_nats),
                     _number(reference.ce_bits_per_byte, 4), "100.0%", "&ndash;"])
    header = ["lens", "layer", "KL (nats)", "KL (bits/byte)", "CE (nats)", "CE (bits/byte)", "top-1 agreement",
              f"heads below {BASELINE}"]
    return "<h2>Summary (mean over heads)</h2>" + _table(header, body)


def top_tokens_section(evaluation: Evaluation) -> str:
    """Build a table of the tokens each head's lens most often ranks first, next to its KL and top-1 agreement."""
    metrics = {(row.layer, row.lens, row.head): row for row in evaluation.rows}
    order = {name: index for index, name in enumerate(lens_order(evaluation.rows))}
    entries: list[HeadTopTokens] = sorted(evaluation.top_tokens, key=lambda e: (e.layer, order[e.lens], e.head))
    body = []
    for entry in entries:
        row = metrics[(entry.layer, entry.lens, entry.head)]
        body.append([html.escape(entry.lens), str(entry.layer), str(entry.head), _number(row.kl_nats),
                     f"{row.top1_agreement:.1%}", _shares(entry.tokens)])
    for layer, reference in _model_references(evaluation):
        body.append(["model itself", layer, "&ndash;", "0", "100.0%", _shares(reference.top_tokens)])
    header = ["lens", "layer", "head", "KL (nats)", "top-1 agreement", "tokens ranked first (share of positions)"]
    return "<h2>Tokens each head's lens ranks first</h2>" + _table(header, body, frozenset({0, len(header) - 1}))


def metrics_section(rows: list[HeadMetrics]) -> str:
    header = ["lens", "layer", "head", "KL (nats)", "KL (bits/byte)", "CE (nats)", "CE (bits/byte)", "top-1",
              "positions", "bytes"]
    body = [[html.escape(r.lens), str(r.layer), str(r.head), _number(r.kl_nats), _number(r.kl_bits_per_byte, 4),
             _number(r.ce_nats), _number(r.ce_bits_per_byte, 4), f"{r.top1_agreement:.1%}", str(r.n_positions),
             str(r.n_bytes) if r.n_bytes is not None else "&ndash;"] for r in rows]
    return ("<details><summary>Every head's metrics (also in metrics.json and metrics.csv)</summary>"
            + _table(header, body) + "</details>")


def render_html(evaluation: Evaluation) -> str:
    """Render the report page as one HTML string with the plots embedded."""
    rows = evaluation.rows
    figures = [("KL(model || lens) per head", heatmap_figure(rows, "kl_nats", "KL (nats)")),
               ("Top-1 agreement with the model per head", heatmap_figure(rows, "top1_agreement", "top-1 agreement"))]
    difference = difference_figure(rows)
    if difference is not None:
        figures.append((f"Lens minus {BASELINE} baseline: KL (nats), negative where the lens is closer", difference))
    plots = "".join(f"<h2>{html.escape(title)}</h2>{_img(figure_png(fig), title)}" for title, fig in figures)

    lens_paths = sorted({(row.lens, row.lens_path) for row in rows if row.lens_path is not None})
    sources = "".join(f"<li><code>{html.escape(name)}</code>: <code>{html.escape(path)}</code></li>"
                      for name, path in lens_paths)
    positions = max(row.n_positions for row in rows)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>headlens report: {html.escape(evaluation.model_name)}</title>
<style>{STYLE}</style></head><body>
<h1>headlens report: {html.escape(evaluation.model_name)}</h1>
<p>Store <code>{html.escape(evaluation.store_url)}</code>, {positions} held-out positions per layer.</p>
<ul>{sources}</ul>
<p class="note">KL is KL(model || lens) per position, in nats. CE is the cross-entropy of the lens against the
token that actually follows. Bits per byte divide the summed bits by the UTF-8 bytes of the text the next
tokens spell, so they compare across tokenizers. They leave out the last position of each sequence, because its
next token is not stored. Top-1 agreement is the share of positions at which the lens and the model rank the same
token first. <code>{BASELINE}</code> is the direct-logit-attribution baseline.</p>
{summary_section(evaluation)}
{plots}
{top_tokens_section(evaluation)}
{metrics_section(rows)}
</body></html>
"""


def write_html_report(evaluation: Evaluation, out_dir: str | Path) -> Path:
    """Write ``report.html`` into ``out_dir`` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(render_html(evaluation), encoding="utf-8")
    logger.info("wrote %s", path)
    return path
