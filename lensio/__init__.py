"""The headlens store: schema, writer, reader and checks."""

from lensio.store import Store, open_store

__all__ = ["Store", "open_store"]
