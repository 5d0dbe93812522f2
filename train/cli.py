"""Command-line entry points ``lens-train``, ``lens-eval`` and ``lens-inspect``."""

import json
import logging
from pathlib import Path

import click

from lensio.cli_common import configure_lightning_logging, configure_logging
from train.lenses import LENS_REGISTRY
from train.loss import Objective

logger = logging.getLogger(__name__)

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def _parse_lens_list(value: str) -> tuple[str, ...]:
    kinds = tuple(part.strip() for part in value.split(","))
    return kinds


@click.command(context_settings=CONTEXT)
@click.option("--store", required=True, help="Store path or URL written by lens-extract.")
@click.option("--layer", type=int, required=True, help="Layer whose heads get lenses.")
@click.option("--out", default=None, help="Lens folder [default: lenses/layer{L:02d}-{lens}]; with several lens kinds, the parent folder.")
@click.option("--lens", "lens", default="translator", help=f"Lens kind, or a comma list of kinds: {', '.join(sorted(LENS_REGISTRY))}.")
@click.option("--objective", type=click.Choice([o.value for o in Objective]), default=Objective.PER_HEAD.value,
              help="Fit each head's lens alone, or the sum of the layer's head lenses (AttentionLens).")
@click.option("--lr", type=float, default=1e-3, help="Adam learning rate.")
@click.option("--batch-tokens", type=int, default=512, help="Token positions per step and device.")
@click.option("--max-steps", type=int, default=500, help="Optimizer steps.")
@click.option("--val-every", type=int, default=100, help="Steps between validations on held-out sequences.")
@click.option("--val-tokens", type=int, default=4096, help="Held-out positions per validation (0 for all).")
@click.option("--seed", type=int, default=0, help="Seed of initialisation and data order.")
@click.option("--devices", default="auto", help="Lightning devices: a count, a list, or 'auto'.")
@click.option("--num-nodes", type=int, default=1, help="Machines taking part in distributed training.")
@click.option("--strategy", default="auto", help="Lightning strategy: auto, ddp, fsdp, ...")
@click.option("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed, 16-mixed, ...")
@click.option("--num-workers", type=int, default=0, help="Data-loader worker processes.")
@click.option("--rank", type=int, default=16, help="Rank of the lowrank lens's correction.")
@click.option("--temperature", type=float, default=1.0, help="Divides model and lens logits before the KL.")
@click.option("--last-position-only", is_flag=True, help="Train on the last position of each sequence only.")
@click.option("--block-mb", type=int, default=256, help="Memory bound of one block of float32 logits in the loss, in MiB.")
@click.option("--quiet", is_flag=True, help="Hide progress bars and info logs.")
def train_main(**options) -> None:
    """Train lenses for every head of one layer from a store, without loading the base model."""
    quiet = options.pop("quiet")
    configure_logging(quiet)
    from train.config import TrainConfig

    devices = options.pop("devices")
    # Checked before Lightning is imported, which takes several seconds on a small CPU.
    config = TrainConfig(
        **{key: value for key, value in options.items() if key not in ("lens", "objective", "val_tokens")},
        lenses=_parse_lens_list(options["lens"]), objective=Objective(options["objective"]),
        val_tokens=options["val_tokens"] if options["val_tokens"] != 0 else None,
        devices=int(devices) if devices.isdigit() else devices,
        progress=not quiet,
    )
    configure_lightning_logging(quiet)
    from train.fit import run

    from lightning.pytorch.utilities import rank_zero_only

    results = run(config)
    if rank_zero_only.rank != 0:
        return  # under DDP every rank returns here; rank 0 alone reports, as it alone saved the lenses
    for trained in results:
        kl = f"{trained.best_val_kl:.4f} nats" if trained.best_val_kl is not None else "not validated"
        click.echo(f"{trained.lens} lens for layer {config.layer}: {trained.path} (held-out KL {kl}, "
                   f"{trained.steps} step{'s' if trained.steps != 1 else ''}, {trained.seconds:.0f} s)")


@click.command(context_settings=CONTEXT)
@click.option("--store", required=True, help="Store path or URL with held-out sequences.")
@click.option("--lens", "lens_dirs", multiple=True, required=True,
              help="Lens folder; repeat the option or list several after it. Lenses may differ in kind and layer.")
@click.argument("more_lens_dirs", nargs=-1)
@click.option("--out", required=True,
              help="Report folder for metrics.json, metrics.csv and heatmap.png (and report.html with --report).")
@click.option("--report", "html_report", is_flag=True,
              help="Also write report.html: heatmaps, differences to the baseline and each head's top tokens.")
@click.option("--max-tokens", type=int, default=None, help="Held-out positions to evaluate per layer [default: all].")
@click.option("--batch-tokens", type=int, default=512, help="Positions per evaluation batch.")
@click.option("--no-baseline", is_flag=True, help="Skip the DLA baseline.")
@click.option("--quiet", is_flag=True, help="Hide progress bars and info logs.")
def eval_main(store: str, lens_dirs: tuple[str, ...], more_lens_dirs: tuple[str, ...], out: str, html_report: bool,
              max_tokens: int | None, batch_tokens: int, no_baseline: bool, quiet: bool) -> None:
    """Evaluate lenses and the DLA baseline per head on the store's held-out sequences."""
    configure_logging(quiet)
    from lensio.errors import BadInputError
    from lensio.store import open_store
    from train.evaluate import evaluate_details, write_reports
    from train.saving import load_lens

    if max_tokens is not None and max_tokens <= 0:
        raise BadInputError(f"--max-tokens must be positive, got {max_tokens}")
    if batch_tokens <= 0:
        raise BadInputError(f"--batch-tokens must be positive, got {batch_tokens}")
    if Path(out).exists() and not Path(out).is_dir():
        raise BadInputError(f"--out {out!r} is a file; pass a folder for the report files")
    paths = _distinct_lens_dirs((*lens_dirs, *more_lens_dirs))
    opened = open_store(store)
    from train.fit import check_store_complete

    check_store_complete(opened)
    lenses = [load_lens(path, opened) for path in paths]
    evaluation = evaluate_details(opened, lenses, paths=paths, max_tokens=max_tokens, batch_tokens=batch_tokens,
                                  baseline=not no_baseline, progress=not quiet)
    written = list(write_reports(evaluation.rows, out).values())
    if html_report:
        from train.report import write_html_report

        written.append(write_html_report(evaluation, out))
    click.echo(summarise(evaluation.rows))
    click.echo(f"report: {', '.join(str(path) for path in written)}")


def _distinct_lens_dirs(paths: tuple[str, ...]) -> list[str]:
    """Reject a lens folder given twice, which would be evaluated twice under two names."""
    from lensio.errors import BadInputError

    seen: dict[Path, str] = {}
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            raise BadInputError(f"lens folder {path!r} is given twice (also as {seen[resolved]!r}); pass each once")
        seen[resolved] = path
    return list(paths)


def summarise(rows) -> str:
    """Summarise per lens and layer in one line each: mean KL, bits per byte, cross-entropy, top-1 agreement and
    the heads where the lens beats DLA."""
    from collections import defaultdict

    groups = defaultdict(list)
    for row in rows:
        groups[(row.layer, row.lens)].append(row)
    lines = []
    for (layer, lens), group in sorted(groups.items()):
        kl = sum(r.kl_nats for r in group) / len(group)
        top1 = sum(r.top1_agreement for r in group) / len(group)
        line = f"layer {layer} {lens:<10} mean KL {kl:.3f} nats"
        if all(r.kl_bits_per_byte is not None for r in group):
            line += f" ({sum(r.kl_bits_per_byte for r in group) / len(group):.4f} bits/byte)"
        if all(r.ce_nats is not None for r in group):
            line += f", cross-entropy {sum(r.ce_nats for r in group) / len(group):.3f} nats"
        line += f", top-1 agreement {top1:.1%}"
        baseline = {r.head: r.kl_nats for r in groups.get((layer, "dla"), [])}
        if lens != "dla" and baseline:
            better = sum(1 for r in group if r.kl_nats < baseline.get(r.head, float("inf")))
            line += f"; below DLA on {better}/{len(group)} heads"
        lines.append(line)
    return "\n".join(lines)


@click.command(context_settings=CONTEXT)
@click.option("--lens", "lens_dir", required=True, help="Lens folder written by lens-train.")
@click.option("--store", default=None, help="Store with the example [default: the lens's training store].")
@click.option("--example", type=int, default=None, help="Index of a stored sequence [default: the first held-out one].")
@click.option("--position", type=int, default=-1, help="Position in the sequence (negative counts from the end).")
@click.option("--heads", default=None, help="Heads to show, e.g. '0,3-5' [default: all].")
@click.option("--top-k", type=int, default=5, help="Tokens shown per head.")
@click.option("--prompt", default=None, help="Text to run through --model instead of a stored example.")
@click.option("--model", default=None, help="Model for --prompt (name, local folder or .gguf file).")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", help="Output format.")
@click.option("--quiet", is_flag=True, help="Hide info logs.")
def inspect_main(**options) -> None:
    """Show the top-k tokens each head's lens predicts at one position, next to the model's own."""
    configure_logging(options.pop("quiet"))
    from train.inspect import InspectConfig, format_table, run

    output_format = options.pop("output_format")
    result = run(InspectConfig(**options))
    click.echo(json.dumps(result, indent=2) if output_format == "json" else format_table(result))
