"""Text sources: local ``.txt``, ``.jsonl`` and ``.parquet`` files (or a folder of them) and Hugging Face datasets."""

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lensio.errors import DatasetError

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_DATASET = "NeelNanda/pile-10k"


@dataclass
class TextSource:
    """A parsed ``--dataset`` value. ``files`` is empty for a Hugging Face dataset."""

    value: str
    split: str = "train"
    text_column: str = "text"
    files: list[Path] = field(default_factory=list)

    @property
    def is_local(self) -> bool:
        return bool(self.files)

    def record(self) -> dict[str, Any]:
        """Build the ``dataset`` group attribute, which tells whether a resumed run reads the same text."""
        if not self.is_local:
            return {"kind": "hub", "name": self.value, "split": self.split, "text_column": self.text_column}
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return {"kind": "local", "path": str(Path(self.value).resolve()), "text_column": self.text_column,
                "files": [path.name for path in self.files], "sha256": digest.hexdigest()}


def parse_text_source(value: str, split: str = "train", text_column: str = "text") -> TextSource:
    """Classify ``--dataset``: an existing path must be a supported file or a folder holding some."""
    path = Path(value).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DatasetError(f"folder {value!r} contains no .txt, .jsonl or .parquet files; add text files or "
                               "pass another --dataset")
        return TextSource(value, split, text_column, files)
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise DatasetError(f"dataset file {value!r} has an unsupported type {path.suffix!r}; use .txt, .jsonl "
                               "or .parquet")
        return TextSource(value, split, text_column, [path])
    if value.startswith((".", "/", "~")) or Path(value).suffix in LOCAL_SUFFIXES:
        raise DatasetError(f"dataset path {value!r} not found; check the path")
    return TextSource(value, split, text_column)


def _read_jsonl(path: Path, column: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}:{line_number} is not valid JSON ({error.msg}); fix the line") from error
            if column not in record:
                raise DatasetError(f"text column {column!r} missing in {path}:{line_number} (keys: "
                                   f"{', '.join(sorted(record))}); pass --text-column")
            yield str(record[column])


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if column not in table.column_names:
        raise DatasetError(f"text column {column!r} missing in {path} (columns: {', '.join(table.column_names)}); "
                           "pass --text-column")
    yield from (str(text) for text in table.column(column).to_pylist())


def _read_local(source: TextSource) -> list[str]:
    documents: list[str] = []
    for path in source.files:
        if path.suffix == ".txt":
            documents.append(path.read_text(encoding="utf-8", errors="replace"))
        elif path.suffix == ".jsonl":
            documents.extend(_read_jsonl(path, source.text_column))
        else:
            documents.extend(_read_parquet(path, source.text_column))
    return [doc for doc in documents if doc.strip()]


def _iter_hub(source: TextSource, seed: int) -> Iterator[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.value, split=source.split, streaming=True)
    except Exception as error:  # noqa: BLE001 - datasets raises many unrelated types for an unreachable hub
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DatasetError(f"could not load dataset {source.value!r} from the Hugging Face Hub ({first_line}), and "
                           "no local file or folder of that name exists; pass --dataset with local .txt, .jsonl or "
                           ".parquet files or a folder of them") from error
    dataset = dataset.shuffle(seed=seed, buffer_size=10_000)
    for record in dataset:
        if source.text_column not in record:
            raise DatasetError(f"text column {source.text_column!r} missing in dataset {source.value!r} (columns: "
                               f"{', '.join(sorted(record))}); pass --text-column")
        text = record[source.text_column]
        if text and str(text).strip():
            yield str(text)


def iter_documents(source: TextSource, seed: int) -> Iterator[str]:
    """Yield documents in a seeded random order, so the held-out tail is a random sample of documents."""
    if source.is_local:
        documents = _read_local(source)
        random.Random(seed).shuffle(documents)
        logger.info("read %d documents from %d local file(s)", len(documents), len(source.files))
        yield from documents
    else:
        yield from _iter_hub(source, seed)
