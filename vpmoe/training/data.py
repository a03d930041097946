"""Data pipeline: documents from the built-in corpus or user files, tokenised and packed into rows.

Rows are windows of `seq_length + 1` tokens over the stream "document, <|endoftext|>, document, ...";
consecutive rows overlap by one token, so every token after the first is a label exactly once. The
stream is a pure function of (source, split, seq_length, seed): rows are numbered 0, 1, 2, ... and any
row number can be resumed from. When the split's documents run out, the next epoch starts with a new
shuffle, seeded by (seed, epoch).

A document yields many consecutive rows (a 50,000-character piece is about 100 rows of 128 tokens),
so the packed rows pass through a seeded shuffle buffer of `shuffle_rows` rows before batching: a
batch then mixes rows of many documents and domains instead of eight windows of one file, which
keeps the per-step loss from swinging with whichever file is being read.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vpmoe.tokenizer import get_tokenizer
from vpmoe.training.corpus import (
    DOMAINS,
    HELDOUT_FRACTION,
    MAX_DOCUMENT_CHARS,
    CorpusEntry,
    Document,
    builtin_entries,
    cut_lines,
    describe_builtin,
    heldout_score,
)

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
DOMAIN_FIELD = "domain"
SHUFFLE_BUFFER_DOCUMENTS = 256
SHUFFLE_BUFFER_ROWS = 1024
ROW_SHUFFLE_STREAM = 1  # keeps the row shuffle's random stream apart from the per-epoch document shuffles
TOKENIZE_BATCH_DOCUMENTS = 32
PARQUET_BATCH_ROWS = 1024
HELDOUT_STRIDE = round(1 / HELDOUT_FRACTION)


class DataError(ValueError):
    """The data a user pointed at cannot be used; the message names the file, line or field."""


@dataclass(frozen=True)
class Batch:
    """One rank's share of a global batch: inputs, next-token labels and each row's domain index."""

    tokens: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    first_row: int


class Tokenizer(Protocol):
    """What packing needs from a tokenizer (vpmoe.tokenizer.HarmonyTokenizer provides it)."""

    eot_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class _BuiltinSource:
    """The built-in corpus of one split; its units are corpus entries, shuffled by key."""

    def __init__(self, split: str) -> None:
        self.units: list[CorpusEntry] = builtin_entries(split)
        self.domains = DOMAINS

    def read(self, unit: CorpusEntry) -> Iterator[Document]:
        return iter(unit.documents())

    def describe(self) -> dict:
        return describe_builtin()


class _UserSource:
    """User files of one split; its units are files. Construction reads everything once, streaming, to
    fail early on bad input and to learn the domains and document counts."""

    def __init__(self, source: str, split: str, text_field: str) -> None:
        self.source = source
        self.split = split
        self.text_field = text_field
        files = find_data_files(source)
        self.root = Path(os.path.commonpath([path.parent for path in files]))
        self.units: list[Path] = []
        self.documents = {"train": 0, "heldout": 0}
        domains: set[str] = set()
        for path in files:
            relative = self._relative(path)
            file_documents = {"train": 0, "heldout": 0}
            file_domains: set[str] = set()
            try:
                for index, document in self._records(path):
                    file_documents["heldout" if is_heldout_document(relative, index) else "train"] += 1
                    file_domains.add(document.domain)
            except UnicodeDecodeError as error:
                if path.suffix != ".txt":
                    raise DataError(f"{path} is not UTF-8 text ({error})") from error
                warnings.warn(f"skipping {path}: not UTF-8 text ({error})", stacklevel=3)
                continue
            for split_name, count in file_documents.items():
                self.documents[split_name] += count
            domains |= file_domains
            self.units.append(path)
        if not sum(self.documents.values()):
            raise DataError(f"no usable documents in {source} (every file is empty, blank or not UTF-8)")
        if not self.documents[split]:
            raise DataError(
                f"no {split} documents in {source}: one document in {HELDOUT_STRIDE} of each file is held "
                f"out, so a file with fewer documents may have none, and the documents here split "
                f"{self.documents['train']} train / {self.documents['heldout']} held out; use more documents"
            )
        self.domains = tuple(sorted(domains))

    def read(self, unit: Path) -> Iterator[Document]:
        relative = self._relative(unit)
        for index, document in self._records(unit):
            if is_heldout_document(relative, index) == (self.split == "heldout"):
                yield document

    def describe(self) -> dict:
        listing = "\n".join(f"{self._relative(path)} {path.stat().st_size}" for path in self.units)
        return {
            "source": self.source,
            "root": str(self.root.resolve()),
            "text_field": self.text_field,
            "files": len(self.units),
            "documents": dict(self.documents),
            "fingerprint": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
        }

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _records(self, path: Path) -> Iterator[tuple[int, Document]]:
        """(record index in the file, document) for each piece of text in the file, in file order."""
        relative = self._relative(path)
        if path.suffix == ".txt":
            yield from _text_file_records(path, relative)
        elif path.suffix == ".jsonl":
            yield from _jsonl_records(path, relative, self.text_field)
        else:
            yield from _parquet_records(path, relative, self.text_field)


def find_data_files(source: str) -> list[Path]:
    """The .txt, .jsonl and .parquet files named by a folder (searched recursively), a glob or one file."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in SUPPORTED_SUFFIXES:
            kind = f"a {path.suffix} file" if path.suffix else "a file without suffix"
            raise DataError(f"{source} is {kind}; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    if path.is_dir():
        candidates = [p for p in path.rglob("*") if p.is_file()]
        what = f"folder {source}"
    elif any(char in source for char in "*?["):
        matches = [Path(match) for match in glob.glob(source, recursive=True)]
        if not matches:
            raise DataError(f"the glob {source} matches no files")
        candidates = [p for m in matches for p in ([m] if m.is_file() else m.rglob("*")) if p.is_file()]
        what = f"the files matched by {source}"
    else:
        raise DataError(f"data path {source} does not exist")
    files = sorted({p for p in candidates if p.suffix in SUPPORTED_SUFFIXES})
    if not files:
        raise DataError(f"no {', '.join(SUPPORTED_SUFFIXES)} files in {what}")
    return files


def _pieces(text: str) -> list[str]:
    """A document's text cut into pieces of at most MAX_DOCUMENT_CHARS; blank text gives none."""
    return list(cut_lines(text.splitlines(keepends=True), MAX_DOCUMENT_CHARS)) if text.strip() else []


def is_heldout_document(relative: str, index: int) -> bool:
    """Whether record `index` of the file at `relative` path is held out: every HELDOUT_STRIDE-th record,
    starting at a phase set by the hash of the path, so any file of HELDOUT_STRIDE records or more
    contributes, and single-record files are held out as built-in corpus entries are."""
    phase = int(heldout_score(relative) * HELDOUT_STRIDE)
    return (index + phase) % HELDOUT_STRIDE == 0


def _record_documents(index: int, name: str, text: str, domain: str) -> Iterator[tuple[int, Document]]:
    """A record's text as documents, all under the record's index so that they share its split."""
    pieces = _pieces(text)
    for number, piece in enumerate(pieces):
        yield index, Document(piece, domain, name if len(pieces) == 1 else f"{name}#{number}")


def _text_file_records(path: Path, relative: str) -> Iterator[tuple[int, Document]]:
    """A .txt file is one document, read line by line and cut into pieces; each piece counts as a record
    of its own, so that a single large file still gives the held-out split some text."""
    with path.open(encoding="utf-8") as lines:
        pieces = (piece for piece in cut_lines(lines, MAX_DOCUMENT_CHARS) if piece.strip())
        for index, piece in enumerate(pieces):
            yield index, Document(piece, "txt", f"{relative}#{index}")


def _jsonl_records(path: Path, relative: str, text_field: str) -> Iterator[tuple[int, Document]]:
    """One document per JSON line, its text in `text_field` and an optional string `domain` field."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where} is not valid JSON: {error.msg} (column {error.colno})") from error
            if not isinstance(record, dict):
                raise DataError(f"{where} is a JSON {type(record).__name__}, expected an object")
            if text_field not in record:
                raise DataError(f"{where} has no field {text_field!r} (fields: {sorted(record)})")
            text = _checked_text(record[text_field], f"{where} field {text_field!r}")
            domain = _checked_domain(record.get(DOMAIN_FIELD), where, default="jsonl")
            yield from _record_documents(number - 1, f"{relative}:{number}", text, domain)


def _parquet_records(path: Path, relative: str, text_field: str) -> Iterator[tuple[int, Document]]:
    """One document per row of column `text_field`, read one record batch at a time."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable Parquet file: {error}") from error
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path} has no column {text_field!r} (columns: {columns})")
    wanted = [text_field] + ([DOMAIN_FIELD] if DOMAIN_FIELD in columns else [])
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        texts = batch.column(text_field).to_pylist()
        domains = batch.column(DOMAIN_FIELD).to_pylist() if DOMAIN_FIELD in wanted else [None] * len(texts)
        for text, domain_value in zip(texts, domains, strict=True):
            where = f"{path} row {row}"
            if text is not None:
                checked = _checked_text(text, f"{where} column {text_field!r}")
                domain = _checked_domain(domain_value, where, default="parquet")
                yield from _record_documents(row, f"{relative}:{row}", checked, domain)
            row += 1


def _checked_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where} is a {type(value).__name__}, expected a string")
    return value


def _checked_domain(value: object, where: str, *, default: str) -> str:
    """A record's domain: its `domain` field when that is a non-empty string, else the file's format."""
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise DataError(f"{where} field {DOMAIN_FIELD!r} is a {type(value).__name__}, expected a string")
    return value


class PackedDataset:
    """Rows of `seq_length + 1` token ids, each labelled with the domain of most of its input tokens."""

    domains: tuple[str, ...]

    def __init__(
        self,
        source: str | os.PathLike[str] | None,
        *,
        split: Literal["train", "heldout"] = "train",
        seq_length: int,
        seed: int = 0,
        text_field: str = "text",
        tokenizer: Tokenizer | None = None,
        shuffle_rows: int = SHUFFLE_BUFFER_ROWS,
    ) -> None:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be at least 1, got {seq_length}")
        if shuffle_rows < 0:
            raise ValueError(f"shuffle_rows must be non-negative (0 or 1: no row shuffle), got {shuffle_rows}")
        self.split = split
        self.seq_length = seq_length
        self.seed = seed
        self.shuffle_rows = shuffle_rows
        self._source = _BuiltinSource(split) if source is None else _UserSource(os.fspath(source), split, text_field)
        self._tokenizer = tokenizer or get_tokenizer()
        self.domains = self._source.domains
        self._domain_index = {domain: index for index, domain in enumerate(self.domains)}

    def documents(self, epoch: int) -> Iterator[Document]:
        """The split's documents in one epoch's order: units permuted, then a shuffle buffer, seeded by
        (seed, epoch); memory stays bounded by the buffer."""
        rng = np.random.default_rng([self.seed, epoch])
        units = self._source.units
        ordered = (document for i in rng.permutation(len(units)) for document in self._source.read(units[i]))
        buffer: list[Document] = []
        for document in ordered:
            if len(buffer) < SHUFFLE_BUFFER_DOCUMENTS:
                buffer.append(document)
                continue
            slot = int(rng.integers(len(buffer)))
            yield buffer[slot]
            buffer[slot] = document
        for index in rng.permutation(len(buffer)):
            yield buffer[index]

    def rows(self, start_row: int = 0) -> Iterator[tuple[np.ndarray, int]]:
        """(row of seq_length + 1 int64 token ids, domain index) from row `start_row` on, without end.

        Rows come out of the row shuffle buffer; resuming re-tokenises the rows before `start_row` and
        skips them.
        """
        if start_row < 0:
            raise ValueError(f"start_row must be non-negative, got {start_row}")
        return itertools.islice(self._shuffled(self.packed_rows()), start_row, None)

    def batches(self, batch_size: int, *, start_row: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Batches of `batch_size` rows for one rank: global batch i holds rows
        start_row + [i*B*W, (i+1)*B*W) and rank r takes the r-th block of B of them."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size; "
                f"got batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        rows = self.rows(start_row)
        global_rows = batch_size * world_size
        for step in itertools.count():
            group = list(itertools.islice(rows, global_rows))[rank * batch_size : (rank + 1) * batch_size]
            table = np.stack([tokens for tokens, _ in group])
            yield Batch(
                tokens=torch.from_numpy(np.ascontiguousarray(table[:, :-1])),
                labels=torch.from_numpy(np.ascontiguousarray(table[:, 1:])),
                domains=torch.tensor([domain for _, domain in group], dtype=torch.int64),
                first_row=start_row + step * global_rows + rank * batch_size,
            )

    def describe(self) -> dict:
        """Provenance for a run: the source and its listing, split, seq_length, seed and domains."""
        return {
            **self._source.describe(),
            "split": self.split,
            "seq_length": self.seq_length,
            "seed": self.seed,
            "shuffle_rows": self.shuffle_rows,
            "domain_names": list(self.domains),
        }

    def _tokenized_documents(self, epoch: int) -> Iterator[tuple[np.ndarray, int]]:
        """(token ids followed by <|endoftext|>, domain index) per document of one epoch."""
        documents = self.documents(epoch)
        seen = 0
        while group := list(itertools.islice(documents, TOKENIZE_BATCH_DOCUMENTS)):
            seen += len(group)
            token_ids = self._tokenizer.encode_batch([document.text for document in group])
            for document, ids in zip(group, token_ids, strict=True):
                tokens = np.array([*ids, self._tokenizer.eot_id], dtype=np.int64)
                yield tokens, self._domain_index[document.domain]
        if not seen:
            raise DataError(f"the {self.split} split has no documents")

    def _shuffled(self, rows: Iterator[tuple[np.ndarray, int]]) -> Iterator[tuple[np.ndarray, int]]:
        """`rows` through a seeded buffer of `shuffle_rows` slots: each new row takes the place of a random
        one, which is emitted (the stream has no end, so the buffer is never drained)."""
        if self.shuffle_rows <= 1:
            yield from rows
            return
        rng = np.random.default_rng([self.seed, ROW_SHUFFLE_STREAM])
        buffer: list[tuple[np.ndarray, int]] = []
        for row in rows:
            if len(buffer) < self.shuffle_rows:
                buffer.append(row)
                continue
            slot = int(rng.integers(len(buffer)))
            yield buffer[slot]
            buffer[slot] = row

    def packed_rows(self) -> Iterator[tuple[np.ndarray, int]]:
        """The packed rows in stream order, before the row shuffle (what `rows` draws from)."""
        width = self.seq_length + 1
        pending_tokens = np.empty(0, dtype=np.int64)
        pending_domains = np.empty(0, dtype=np.int64)
        for epoch in itertools.count():
            for ids, domain in self._tokenized_documents(epoch):
                pending_tokens = np.concatenate([pending_tokens, ids])
                pending_domains = np.concatenate([pending_domains, np.full(len(ids), domain, dtype=np.int64)])
                start = 0
                while len(pending_tokens) - start >= width:
                    inputs_domains = pending_domains[start : start + self.seq_length]
                    majority = int(np.bincount(inputs_domains, minlength=len(self.domains)).argmax())
                    yield pending_tokens[start : start + width].copy(), majority
                    start += self.seq_length
                pending_tokens, pending_domains = pending_tokens[start:], pending_domains[start:]


def unigram_loss(dataset: PackedDataset, num_rows: int) -> float:
    """Cross-entropy (nats/token) of a unigram model fit on, and scored on, the labels of the first rows.

    The baseline a language model must beat: it is the entropy of the labels' token frequencies.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be at least 1, got {num_rows}")
    labels = np.concatenate([tokens[1:] for tokens, _ in itertools.islice(dataset.rows(), num_rows)])
    counts = np.unique(labels, return_counts=True)[1]
    probabilities = counts / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


UNIGRAM_SMOOTHING = 0.5  # add-1/2 (Jeffreys) counts, so a token unseen in the fit rows has a finite cost


def unigram_cross_entropy(fit: PackedDataset, fit_rows: int, score: PackedDataset, score_rows: int,
                          vocab_size: int) -> float:
    """Cross-entropy (nats/token) on the labels of the first `score_rows` rows of `score` of a unigram model
    fit, with add-1/2 smoothing over `vocab_size` ids, on the labels of the first `fit_rows` rows of `fit`.

    The fair baseline for a held-out loss: a model that knows only how often each token occurs in training.
    """
    if fit_rows < 1 or score_rows < 1:
        raise ValueError(f"fit_rows and score_rows must be at least 1, got {fit_rows} and {score_rows}")
    fit_labels = np.concatenate([tokens[1:] for tokens, _ in itertools.islice(fit.rows(), fit_rows)])
    counts = np.bincount(fit_labels, minlength=vocab_size) + UNIGRAM_SMOOTHING
    log_probabilities = np.log(counts) - np.log(counts.sum())
    scored = np.concatenate([tokens[1:] for tokens, _ in itertools.islice(score.rows(), score_rows)])
    return float(-log_probabilities[scored].mean())
