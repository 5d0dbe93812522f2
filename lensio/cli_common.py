"""Logging set-up shared by every command-line entry point."""

import logging
import os


def configure_logging(quiet: bool = False) -> None:
    """Send library logs to stderr once, with the distributed rank when one is set."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format=f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "fsspec", "filelock", "transformer_lens"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
