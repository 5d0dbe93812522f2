"""Logging set-up shared by every command-line entry point."""

import logging
import os
import sys
import warnings


def configure_logging(quiet: bool = False) -> None:
    """Send library logs to stderr once, with the distributed rank when one is set."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format=f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "fsspec", "filelock", "transformer_lens"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet:
        # transformers draws its own weight-loading bars on stderr. It reads this variable when imported, and
        # disable_progress_bar covers an import that already happened (a command run in-process).
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def configure_lightning_logging(quiet: bool = False) -> None:
    """Send Lightning's logs through the root handler once, and hide its INFO lines when ``quiet``.

    Importing Lightning sets its loggers to INFO and gives the top one a console handler of its own,
    so without this every line shows twice and ``--quiet`` misses them.
    """
    import lightning  # noqa: F401 - the import installs the handler and levels replaced below

    logging.getLogger("lightning").handlers.clear()
    # Lightning 2.6 calls a torch pytree check that torch 2.13 deprecates; users cannot act on it.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    # Its advertisement for a hosted logging service is not about the run.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())
