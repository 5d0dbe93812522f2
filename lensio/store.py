"""Creating and opening headlens stores (Zarr v3 groups) and reading their parameters."""

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, ZstdCodec

from lensio.errors import StoreFormatError, StoreNotFoundError
from lensio.lock import is_lock_file, local_store_path
from lensio.schema import (
    ATTRS_KEY,
    FORMAT_VERSION,
    Compressor,
    LogitsMode,
    StoreDtype,
    StoreLayout,
    z_path,
)

logger = logging.getLogger(__name__)


def compressor_codecs(compressor: Compressor) -> list:
    if compressor is Compressor.ZSTD:
        # Level 1: fp16 activations compress only modestly, so higher levels cost time for little size.
        return [ZstdCodec(level=1)]
    if compressor is Compressor.BLOSC_LZ4:
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=2)]
    return []


def sequence_arrays(layout: StoreLayout) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of every array indexed by sequence, by path."""
    n, t = layout.n_sequences, layout.context
    arrays: dict[str, tuple[tuple[int, ...], np.dtype]] = {"tokens": ((n, t), np.dtype("int32"))}
    for layer in layout.layers:
        arrays[z_path(layer)] = ((n, t, layout.n_heads, layout.d_head), layout.dtype.numpy_dtype)
    arrays["final/scale"] = ((n, t), np.dtype("float32"))
    if layout.logits is LogitsMode.FACTORED:
        arrays["final/normalized"] = ((n, t, layout.d_model), np.dtype("float16"))
    elif layout.logits is LogitsMode.FULL:
        arrays["final/logits"] = ((n, t, layout.d_vocab), np.dtype("float16"))
    else:
        arrays["final/topk_logprobs"] = ((n, t, layout.top_k), np.dtype("float32"))
        arrays["final/topk_ids"] = ((n, t, layout.top_k), np.dtype("int32"))
        arrays["final/logsumexp"] = ((n, t), np.dtype("float32"))
    return arrays


def is_local_folder_with_files(url: str) -> bool:
    """True when ``url`` is a local folder that contains files other than store locks (URLs are not checked)."""
    path = local_store_path(url)
    return path is not None and path.is_dir() and any(not is_lock_file(entry.name) for entry in path.iterdir())


def zarr_location(url: str) -> str:
    """The location to pass to Zarr: a local path for plain paths and ``file://`` URLs, else the URL itself.

    Zarr opens a ``file://`` URL through fsspec, which does not create parent folders and does not
    write through a temporary file and a rename as Zarr's local store does.
    """
    path = local_store_path(url)
    return str(path) if path is not None else url


def open_group(url: str, mode: str) -> zarr.Group:
    """Open the Zarr group at ``url`` (a path or any fsspec URL)."""
    try:
        return zarr.open_group(zarr_location(url), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        if is_local_folder_with_files(url):
            raise StoreFormatError(f"{url!r} is a folder of other files, not a headlens store; pass a store made by "
                                   "lens-extract") from error
        local = local_store_path(url)
        if local is not None and local.is_file():
            raise StoreFormatError(f"{url!r} is a file, not a headlens store; pass the store folder made by "
                                   "lens-extract") from error
        raise StoreNotFoundError(f"no store found at {url!r}; create one with lens-extract --out {url}") from error
    except (ValueError, zarr.errors.NodeTypeValidationError) as error:
        raise StoreFormatError(f"{url!r} is not a readable Zarr group ({error}); pass a store made by lens-extract") from error


@dataclass
class Store:
    """A headlens store opened for reading.

    ``meta`` is the group's provenance record, ``layout`` its shapes and chunking. Activations are
    read lazily through the Zarr arrays (``z(layer)``, ``array(path)``); parameters are loaded once
    as float32 tensors through ``params``.
    """

    url: str
    group: zarr.Group
    meta: dict[str, Any]

    @cached_property
    def layout(self) -> StoreLayout:
        return StoreLayout.from_dict(self.meta["layout"])

    @property
    def layers(self) -> tuple[int, ...]:
        return self.layout.layers

    def array(self, path: str) -> zarr.Array:
        return self.group[path]

    def z(self, layer: int) -> zarr.Array:
        if layer not in self.layers:
            from lensio.errors import BadInputError

            raise BadInputError(
                f"layer {layer} is not in store {self.url!r}, which contains layers "
                f"{','.join(map(str, self.layers))}; pick one of those or extract layer {layer}"
            )
        return self.group[z_path(layer)]

    @property
    def blocks_done(self) -> np.ndarray:
        """One flag per shard-sized block of sequences: 1 once its data is on disk."""
        return np.asarray(self.group["progress/done"][:], dtype=bool)

    @property
    def n_written(self) -> int:
        done = self.blocks_done
        return sum(end - start for block, (start, end) in enumerate(map(self.layout.block_range, range(len(done)))) if done[block])

    @property
    def complete(self) -> bool:
        return bool(self.blocks_done.all())

    @property
    def train_range(self) -> tuple[int, int]:
        return 0, int(self.meta["split"]["val_start"])

    @property
    def val_range(self) -> tuple[int, int]:
        return int(self.meta["split"]["val_start"]), self.layout.n_sequences

    @cached_property
    def params(self) -> dict[str, torch.Tensor]:
        """Every array under ``params/``, as float32 tensors keyed by path below ``params/``."""
        tensors = {}
        for name, node in self.group["params"].members(max_depth=None):
            if isinstance(node, zarr.Array):
                tensors[name] = torch.from_numpy(np.asarray(node[...], dtype=np.float32))
        return tensors

    @property
    def final_norm(self) -> dict[str, Any]:
        return self.meta["final_norm"]

    @property
    def logit_softcap(self) -> float | None:
        return self.meta.get("logit_softcap")

    def read_activations(self, path: str, start: int, end: int) -> np.ndarray:
        """Read sequences ``[start, end)`` of an activation array, as float32 (bf16 decoded)."""
        raw = self.group[path][start:end]
        return decode_activations(raw, self.layout.dtype)


def decode_activations(raw: np.ndarray, dtype: StoreDtype) -> np.ndarray:
    if dtype is StoreDtype.BFLOAT16 and raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def open_store(url: str) -> Store:
    """Open a headlens store for reading, checking that it is one and of a known format version."""
    group = open_group(url, mode="r")
    meta = group.attrs.get(ATTRS_KEY)
    if not isinstance(meta, dict):
        raise StoreFormatError(f"{url!r} is a Zarr group but not a headlens store (no {ATTRS_KEY!r} attribute); "
                               "pass a store made by lens-extract")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreFormatError(f"store {url!r} has format version {version!r}, but this headlens reads version "
                               f"{FORMAT_VERSION}; re-extract it or use a matching headlens release")
    return Store(url=url, group=group, meta=meta)
