"""Logging set-up shared by every command-line entry point."""

import logging
import os
import sys


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
