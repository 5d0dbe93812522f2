"""``lens-extract``: run a frozen model once and write attention outputs and final-norm data to a store."""

import logging

import click

from extract.config import ExtractConfig, resolve_shards
from extract.text import DEFAULT_DATASET
from lensio.cli_common import configure_logging
from lensio.schema import Compressor, LogitsMode, StoreDtype

logger = logging.getLogger(__name__)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", required=True, help="Model name (gpt2-small, gpt2, ...), local Hugging Face folder, or .gguf file.")
@click.option("--layers", required=True, help="Layers to store: '0-11', '0,3,5-7' or 'all'.")
@click.option("--dataset", default=DEFAULT_DATASET, help="Hugging Face dataset name, or local .txt/.jsonl/.parquet file or folder.")
@click.option("--out", default="acts.zarr", help="Store path or fsspec URL to write.")
@click.option("--split", default="train", help="Dataset split (Hugging Face datasets only).")
@click.option("--text-column", default="text", help="Column or JSON key holding the text.")
@click.option("--tokens", type=int, default=None, help="Maximum tokens to extract [default: the whole corpus].")
@click.option("--context", type=int, default=128, help="Tokens per packed sequence.")
@click.option("--batch-size", type=int, default=8, help="Sequences per forward pass.")
@click.option("--dtype", type=click.Choice([d.value for d in StoreDtype]), default=StoreDtype.FLOAT16.value,
              help="Storage dtype of the attention outputs.")
@click.option("--device", default="cpu", help="Torch device for the model (cpu, cuda, cuda:1, ...).")
@click.option("--logits", type=click.Choice([m.value for m in LogitsMode]), default=LogitsMode.FACTORED.value,
              help="How the model's distribution is kept: final-norm output (exact, small), full fp16 logits, or top-k log-probs.")
@click.option("--top-k", type=int, default=64, help="Log-probs kept per position with --logits topk.")
@click.option("--compressor", type=click.Choice([c.value for c in Compressor]), default=Compressor.ZSTD.value,
              help="Lossless codec for every chunk.")
@click.option("--seed", type=int, default=0, help="Seed of the document order.")
@click.option("--revision", default=None, help="Hub revision of the model (names only).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store instead of resuming it.")
@click.option("--chunk-sequences", type=int, default=None, help="Sequences per chunk [default: about 1 MiB of one layer's z].")
@click.option("--chunks-per-shard", type=int, default=None, help="Chunks per shard file [default: up to 16].")
@click.option("--num-shards", type=int, default=None,
              help="Processes writing the store together, each with its own --shard-index "
                   "[default: $WORLD_SIZE when set, else 1].")
@click.option("--shard-index", type=int, default=None,
              help="The shard this process writes, 0 to --num-shards - 1; shard 0 creates the store "
                   "[default: $RANK when $WORLD_SIZE is set, else 0].")
@click.option("--quiet", is_flag=True, help="Hide the progress bar and info logs.")
def main(**options) -> None:
    """Extract per-head attention outputs of LAYERS and the final-norm output into a Zarr store."""
    quiet = options.pop("quiet")
    configure_logging(quiet)
    num_shards, shard_index = resolve_shards(options.pop("num_shards"), options.pop("shard_index"))
    config = ExtractConfig(
        **{**options, "dtype": StoreDtype(options["dtype"]), "logits": LogitsMode(options["logits"]),
           "compressor": Compressor(options["compressor"]), "progress": not quiet, "num_shards": num_shards,
           "shard_index": shard_index},
    )
    from extract.loop import run

    try:
        result = run(config)
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; the blocks already written to {config.out} are kept, and the same "
                                   "command resumes from them") from None
    shard = f"shard {config.shard_index} of {config.num_shards}: " if config.num_shards > 1 else ""
    click.echo(f"{shard}store {result.store_url}: {result.n_sequences} sequences; wrote {result.tokens_written} "
               f"tokens in {result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s)")
    if config.num_shards > 1:
        state = "complete" if result.complete else "incomplete until the other shards finish"
        click.echo(f"store {result.store_url}: {result.n_written} of {result.n_sequences} sequences written, {state}")
