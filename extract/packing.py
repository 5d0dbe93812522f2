"""Packing documents into fixed-length token sequences, with no padding."""

import logging
from collections.abc import Iterable

import numpy as np

from lensio.errors import DatasetError

logger = logging.getLogger(__name__)

TOKENIZE_BATCH = 256


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Tokenize documents and add the tokenizer's document markers.

    A document gets BOS in front when the tokenizer has a BOS distinct from EOS, and EOS behind when
    it has an EOS. GPT-2, whose BOS and EOS are one token, gets a single separator between documents.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = [bos] if bos is not None and bos != eos else []
    suffix = [eos] if eos is not None else []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [prefix + ids + suffix for ids in encoded]


def pack_documents(tokenizer, documents: Iterable[str], context: int, max_tokens: int | None) -> np.ndarray:
    """Concatenate tokenized documents and cut them into ``[seq, context]`` int32 sequences.

    Stops once ``max_tokens`` tokens (rounded down to whole sequences) are packed; the tail shorter
    than one sequence is dropped.

    Raises:
        DatasetError: the text yields fewer than ``context`` tokens.
    """
    max_sequences = None if max_tokens is None else max_tokens // context
    stream: list[int] = []
    sequences: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in document_ids(tokenizer, batch):
            stream.extend(ids)
        batch.clear()
        whole = len(stream) // context
        if whole:
            block = np.asarray(stream[: whole * context], dtype=np.int32).reshape(whole, context)
            sequences.append(block)
            del stream[: whole * context]

    for text in documents:
        batch.append(text)
        if len(batch) >= TOKENIZE_BATCH:
            flush()
            if max_sequences is not None and sum(len(s) for s in sequences) >= max_sequences:
                break
    else:
        flush()

    packed = np.concatenate(sequences) if sequences else np.zeros((0, context), dtype=np.int32)
    if max_sequences is not None:
        packed = packed[:max_sequences]
    if len(packed) == 0:
        raise DatasetError(f"the corpus is too short: it yields {len(stream)} tokens, fewer than one sequence of "
                           f"--context {context}; add text or lower --context")
    if max_sequences is not None and len(packed) < max_sequences:
        logger.warning("the corpus yields %d tokens, fewer than --tokens %d; extracting all of it",
                       packed.size, max_tokens)
    return packed
