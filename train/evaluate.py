"""Held-out evaluation of lenses and the DLA baseline, per head, and the report files."""

import csv
import json
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lensio.reader import LayerBatches
from lensio.store import Store
from train.lenses import DLALens, Lens, frozen_parts_from_store
from train.loss import blocked_head_kl, targets_from_batch

logger = logging.getLogger(__name__)


@dataclass
class HeadMetrics:
    """Held-out metrics of one head under one lens."""

    layer: int
    head: int
    lens: str
    kl_nats: float
    kl_bits: float
    top1_agreement: float
    n_positions: int


@torch.no_grad()
def evaluate(store: Store, lenses: list[Lens], *, max_tokens: int | None = None, batch_tokens: int = 512,
             baseline: bool = True, progress: bool = True) -> list[HeadMetrics]:
    """KL(model || lens) and top-1 agreement per head on the store's held-out sequences.

    Each lens must carry a ``layer`` attribute (``load_lens`` sets it). With ``baseline`` the DLA lens
    of every layer involved is evaluated on the same positions.
    """
    by_layer: dict[int, list[tuple[str, Lens]]] = defaultdict(list)
    for lens in lenses:
        by_layer[lens.layer].append((lens.kind, lens))
    if baseline:
        for layer in by_layer:
            if "dla" not in {name for name, _ in by_layer[layer]}:
                by_layer[layer].append(("dla", DLALens(frozen_parts_from_store(store, layer))))

    rows: list[HeadMetrics] = []
    for layer, named in sorted(by_layer.items()):
        batches = LayerBatches(store.url, layer, store.val_range, batch_tokens, shuffle=False, max_tokens=max_tokens)
        total = batches.tokens_per_epoch()
        sums = {name: torch.zeros(lens.n_heads) for name, lens in named}
        matches = {name: torch.zeros(lens.n_heads) for name, lens in named}
        seen = 0
        bar = tqdm(total=total, unit="tok", desc=f"eval layer {layer}", disable=not progress)
        for batch in batches:
            reference = named[0][1]
            targets = targets_from_batch(batch.target, reference.W_U, reference.b_U, reference.logit_softcap)
            for name, lens in named:
                features = lens.features(lens.head_outputs(batch.z.float()), batch.scale.float())
                _, summary = blocked_head_kl(lens, features, targets)
                sums[name] += summary.kl_sum
                matches[name] += summary.top1_matches
            seen += len(batch)
            bar.update(len(batch))
        bar.close()
        if seen == 0:
            raise ValueError(f"store {store.url!r} has no held-out positions to evaluate layer {layer} on")
        for name, lens in named:
            for head in range(lens.n_heads):
                kl = float(sums[name][head]) / seen
                rows.append(HeadMetrics(layer, head, name, kl, kl / math.log(2), float(matches[name][head]) / seen, seen))
    return rows


def write_reports(rows: list[HeadMetrics], out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.csv`` and ``heatmap.png`` (layers x heads, one panel per lens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [asdict(row) for row in rows]
    paths = {"json": out / "metrics.json", "csv": out / "metrics.csv", "heatmap": out / "heatmap.png"}
    paths["json"].write_text(json.dumps(records, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    plot_heatmap(rows, paths["heatmap"])
    return paths


def plot_heatmap(rows: list[HeadMetrics], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lens_names = sorted({row.lens for row in rows}, key=lambda name: (name == "dla", name))
    layers = sorted({row.layer for row in rows})
    n_heads = max(row.head for row in rows) + 1
    vmax = max(row.kl_nats for row in rows)
    fig, axes = plt.subplots(1, len(lens_names), figsize=(2.2 + 0.45 * n_heads * len(lens_names), 1.6 + 0.4 * len(layers)),
                             squeeze=False)
    for ax, name in zip(axes[0], lens_names):
        grid = np.full((len(layers), n_heads), np.nan)
        for row in rows:
            if row.lens == name:
                grid[layers.index(row.layer), row.head] = row.kl_nats
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"{name}: KL (nats)")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
