"""``lens-store``: describe and verify headlens stores."""

import json
import logging
import sys
from typing import Any

import click

from lensio.cli_common import configure_logging

logger = logging.getLogger(__name__)

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Describe and verify headlens activation stores."""


def _size_on_disk(url: str) -> int | None:
    """Total bytes of every file of the store, or None when the file system cannot list them."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return int(fs.du(path, total=True))
    except (OSError, NotImplementedError, ValueError) as error:
        logger.warning("could not measure the size of %s: %s", url, error)
        return None


def store_info(url: str) -> dict[str, Any]:
    """Collect the facts that ``lens-store info`` shows, as a JSON-ready dict."""
    from lensio.lock import store_locks
    from lensio.store import open_store

    store = open_store(url)
    layout = store.layout
    meta = store.meta
    n_written = store.n_written
    size = _size_on_disk(url)
    params_size = _size_on_disk(url.rstrip("/") + "/params") if size is not None else None
    # The parameters (W_U above all) are a fixed cost of any store, so they stay out of the per-token figure.
    data_size = size - params_size if size is not None and params_size is not None else None
    tokens_written = n_written * layout.context
    model = meta.get("model", {})
    return {
        "store": url,
        "format_version": meta.get("format_version"),
        "tool_version": meta.get("tool_version"),
        "model": model.get("name"),
        "architecture": model.get("architecture"),
        "n_layers": model.get("n_layers"),
        "n_heads": layout.n_heads,
        "d_head": layout.d_head,
        "d_model": layout.d_model,
        "d_vocab": layout.d_vocab,
        "layers": list(layout.layers),
        "context": layout.context,
        "sequences_written": n_written,
        "sequences_planned": layout.n_sequences,
        "tokens_written": tokens_written,
        "tokens_planned": layout.n_tokens,
        "dtype": layout.dtype.value,
        "logits": layout.logits.value,
        "top_k": layout.top_k,
        "compressor": meta.get("compressor"),
        "sequences_per_chunk": layout.seqs_per_chunk,
        "sequences_per_shard": layout.seqs_per_shard,
        "size_on_disk_bytes": size,
        "params_size_bytes": params_size,
        "bytes_per_token_uncompressed": layout.bytes_per_token,
        "bytes_per_token_on_disk": (round(data_size / tokens_written, 1) if data_size is not None and tokens_written
                                    else None),
        "writers": [status.describe() for status in store_locks(url)],
    }


def _format_bytes(count: int | None) -> str:
    if count is None:
        return "unknown"
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= factor:
            return f"{count / factor:.1f} {unit} ({count} bytes)"
    return f"{count} bytes"


def format_info(info: dict[str, Any]) -> str:
    """Render ``store_info`` as aligned ``name: value`` lines."""
    written = info["sequences_written"]
    planned = info["sequences_planned"]
    on_disk = info["bytes_per_token_on_disk"]
    logits = info["logits"] + (f" (top {info['top_k']})" if info["logits"] == "topk" else "")
    rows = [
        ("store", info["store"]),
        ("format version", info["format_version"]),
        ("model", f"{info['model']} ({info['architecture']}, {info['n_layers']} layers, {info['n_heads']} heads, "
                  f"d_model {info['d_model']}, d_head {info['d_head']}, d_vocab {info['d_vocab']})"),
        ("layers", ",".join(map(str, info["layers"]))),
        ("sequences", f"{written} of {planned} written ({100 * written / planned:.0f}%), {info['context']} tokens each"),
        ("tokens", f"{info['tokens_written']} of {info['tokens_planned']} written"),
        ("dtype", info["dtype"]),
        ("logits", logits),
        ("compressor", info["compressor"]),
        ("chunks", f"{info['sequences_per_chunk']} sequences per chunk, {info['sequences_per_shard']} per shard "
                   "(the unit a resumed extraction redoes)"),
        ("size on disk", _format_bytes(info["size_on_disk_bytes"])
                         + (f", of which model parameters {_format_bytes(info['params_size_bytes'])}"
                            if info["params_size_bytes"] is not None else "")),
        ("bytes per token", f"{info['bytes_per_token_uncompressed']} uncompressed"
                            + (f", {on_disk} on disk without the parameters" if on_disk is not None else "")),
        ("writers", "; ".join(info["writers"]) or "none"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in rows)


@main.command(context_settings=CONTEXT)
@click.argument("store")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", help="Output format.")
@click.option("--quiet", is_flag=True, help="Hide info logs.")
def info(store: str, output_format: str, quiet: bool) -> None:
    """Show what STORE holds: model, layers, progress, dtype, logits mode and size."""
    configure_logging(quiet)
    facts = store_info(store)
    click.echo(json.dumps(facts, indent=2) if output_format == "json" else format_info(facts))


@main.command(context_settings=CONTEXT)
@click.argument("store")
@click.option("--model", default=None,
              help="Model to recompute a sample of sequences with (name, local folder or .gguf file).")
@click.option("--sample", type=int, default=4, help="Sequences recomputed with --model.")
@click.option("--seed", type=int, default=0, help="Seed of the choice of sequences recomputed.")
@click.option("--device", default="cpu", help="Torch device for --model.")
@click.option("--quiet", is_flag=True, help="Hide info logs.")
def verify(store: str, model: str | None, sample: int, seed: int, device: str, quiet: bool) -> None:
    """Check STORE: metadata against arrays, progress against data, NaN and inf, and with --model a sample of
    recomputed sequences. Prints one line per problem; exits with 0 only when there is none."""
    configure_logging(quiet)
    from lensio.verify import format_summary, verify_store

    report = verify_store(store, model=model, sample=sample, seed=seed, device=device)
    if report.ok:
        click.echo(format_summary(report))
        return
    for problem in report.problems:
        click.echo(problem)
    sys.exit(1)
