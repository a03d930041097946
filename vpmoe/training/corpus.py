"""The built-in corpus: real text from the running interpreter's standard library, in three labelled domains.

- code:  the library's Python sources with comments and docstrings removed;
- prose: the library's docstrings (one document per module) and the reference-manual topics of pydoc;
- data:  every other UTF-8 text file shipped with the library (test vectors, markup, certificates, ...).

See docs/corpus.md for the rules and the measured sizes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import os
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DOMAINS: tuple[str, ...] = ("code", "prose", "data")
HELDOUT_FRACTION = 0.05
MIN_HELDOUT_ENTRIES = 3
MAX_DOCUMENT_CHARS = 50_000
MIN_DOCUMENT_CHARS = 200
MAX_FILE_BYTES = 4_000_000

REFERENCE_TOPICS = "pydoc_data/topics.py"
_TEST_FOLDERS = frozenset({"test", "tests", "idle_test"})
_SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload"})
_COMPILED_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class Document:
    """One document: its text, its domain (one of DOMAINS) and where it comes from."""

    text: str
    domain: str
    source: str


@dataclass(frozen=True)
class CorpusEntry:
    """A unit that goes wholly to one split: a source file, a module's docstrings, or one reference topic."""

    domain: str
    key: str
    path: Path
    source_bytes: int

    def documents(self) -> list[Document]:
        """This entry's documents, read now: its text cut into pieces of at most MAX_DOCUMENT_CHARS."""
        text = _entry_text(self)
        if text is None or len(text.strip()) < MIN_DOCUMENT_CHARS:
            return []
        pieces = list(cut_lines(text.splitlines(keepends=True), MAX_DOCUMENT_CHARS))
        if len(pieces) == 1:
            return [Document(pieces[0], self.domain, self.key)]
        return [Document(piece, self.domain, f"{self.key}#{i}") for i, piece in enumerate(pieces)]


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "os.py").is_file():
        raise FileNotFoundError(f"the built-in corpus needs the Python standard library, not found at {root}")
    return root


def heldout_score(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document key; keys scoring lowest are held out."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_heldout(key: str) -> bool:
    """Whether the document with this key belongs to the held-out split (about HELDOUT_FRACTION of keys)."""
    return heldout_score(key) < HELDOUT_FRACTION


def builtin_entries(split: Literal["train", "heldout"]) -> list[CorpusEntry]:
    """The corpus entries of one split, sorted by key (relative path), without reading their text."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return list(_split_entries()[split])


def builtin_documents(split: Literal["train", "heldout"]) -> Iterator[Document]:
    """The documents of one split in key order, read lazily one entry at a time."""
    for entry in builtin_entries(split):
        yield from entry.documents()


def describe_builtin() -> dict:
    """Provenance of the built-in corpus: interpreter, stdlib folder, entries and source bytes per split."""
    splits = _split_entries()
    counts = {
        domain: {
            split: {
                "entries": sum(entry.domain == domain for entry in entries),
                "source_bytes": sum(entry.source_bytes for entry in entries if entry.domain == domain),
            }
            for split, entries in splits.items()
        }
        for domain in DOMAINS
    }
    listing = "\n".join(
        f"{entry.domain} {entry.key} {entry.source_bytes}" for entry in sorted(_all_entries(), key=_order)
    )
    return {
        "source": "builtin",
        "python": sys.version.split()[0],
        "stdlib": str(stdlib_root()),
        "domains": counts,
        "heldout_fraction": HELDOUT_FRACTION,
        "fingerprint": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
    }


def strip_python_source(source: str) -> str:
    """Python source ('\\n' line ends) without comments and docstrings; a docstring that is a whole body
    becomes `pass`. Raises SyntaxError (or tokenize.TokenError) when the source does not parse.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    lines = source.split("\n")
    edits = [
        (token.start[0], token.start[1], token.end[0], token.end[1], "")
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    ]
    for node, docstring in _docstring_statements(tree):
        body_is_docstring = len(node.body) == 1 or node.body[1].lineno == docstring.end_lineno
        replacement = "pass" if body_is_docstring and not isinstance(node, ast.Module) else ""
        edits.append(
            (
                docstring.lineno,
                _char_column(lines[docstring.lineno - 1], docstring.col_offset),
                docstring.end_lineno,
                _char_column(lines[docstring.end_lineno - 1], docstring.end_col_offset),
                replacement,
            )
        )
    # Bottom-up, so that earlier positions stay valid while later text is cut; a line left blank by a cut
    # is dropped (None), but blank lines the author wrote stay.
    kept_lines: list[str | None] = list(lines)
    for start_row, start_col, end_row, end_col, replacement in sorted(edits, reverse=True):
        head, tail = kept_lines[start_row - 1][:start_col], kept_lines[end_row - 1][end_col:]
        joined = head + replacement + tail if tail.strip() else (head + replacement).rstrip()
        kept_lines[start_row - 1 : end_row] = [joined or None]
    return "\n".join(line for line in kept_lines if line is not None)


def module_docstrings(source: str) -> str:
    """The module, class and function docstrings of a Python source in source order, blank-line separated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    documented = sorted(_docstring_statements(tree), key=lambda pair: (pair[1].lineno, pair[1].col_offset))
    texts = (ast.get_docstring(node, clean=True) for node, _ in documented)
    return "\n\n".join(text for text in texts if text and text.strip())


def cut_lines(lines: Iterable[str], limit: int) -> Iterator[str]:
    """Consecutive lines (with their line ends) joined into pieces of at most `limit` characters.

    A piece ends at a line end unless a single line is longer than `limit`; then that line is cut inside.
    """
    current: list[str] = []
    size = 0
    for line in lines:
        if current and size + len(line) > limit:
            yield "".join(current)
            current, size = [], 0
        while len(line) > limit:
            yield line[:limit]
            line = line[limit:]
        current.append(line)
        size += len(line)
    if current:
        yield "".join(current)


def _docstring_statements(tree: ast.Module) -> Iterator[tuple[ast.AST, ast.Expr]]:
    """(owner, statement) for every module, class and function whose body starts with a string."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        # Definitions only live in statement lists, so expressions are never visited: a full ast.walk
        # costs more than the rest of the stripping.
        pending += [
            child
            for child in ast.iter_child_nodes(node)
            if isinstance(child, ast.stmt | ast.excepthandler | ast.match_case)
        ]
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                yield node, first


def _char_column(line: str, byte_offset: int) -> int:
    """ast reports UTF-8 byte offsets; edits need character offsets."""
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))


def _read_text(path: Path) -> str | None:
    """The file as text with '\\n' line ends, or None when it is not UTF-8 text."""
    raw = path.read_bytes()
    if b"\0" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _entry_text(entry: CorpusEntry) -> str | None:
    """The whole text of an entry, or None when its file cannot be used."""
    if entry.domain == "prose" and "::" in entry.key:
        return _reference_topics(entry.path)[entry.key.split("::", 1)[1]]
    text = _read_text(entry.path)
    if text is None or entry.domain == "data":
        return text
    transform = strip_python_source if entry.domain == "code" else module_docstrings
    try:
        return transform(text)
    except (SyntaxError, ValueError, tokenize.TokenError):
        return None


@functools.cache
def _reference_topics(path: Path) -> dict[str, str]:
    """pydoc's reference-manual topics (`topics = {name: text}`), read with ast, not imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "topics" for target in statement.targets
        ):
            return ast.literal_eval(statement.value)
    return {}


def _library_files(root: Path) -> Iterator[tuple[str, Path, bool]]:
    """(relative posix path, path, inside a test folder) for every regular file of the library."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in _SKIPPED_FOLDERS)
        relative_folder = Path(folder).relative_to(root)
        in_tests = not _TEST_FOLDERS.isdisjoint(relative_folder.parts)
        for name in sorted(files):
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield (relative_folder / name).as_posix(), path, in_tests


@functools.cache
def _all_entries() -> tuple[CorpusEntry, ...]:
    """Every entry of the corpus, both splits; only data files are read here (to drop binary ones)."""
    entries = []
    root = stdlib_root()
    for relative, path, in_tests in _library_files(root):
        size = path.stat().st_size
        if size < MIN_DOCUMENT_CHARS or size > MAX_FILE_BYTES or relative.endswith(_COMPILED_SUFFIXES):
            continue
        if relative == REFERENCE_TOPICS:
            entries += [
                CorpusEntry("prose", f"{relative}::{name}", path, len(text))
                for name, text in _reference_topics(path).items()
            ]
        elif relative.endswith(".py"):
            if not in_tests:
                entries += [CorpusEntry(domain, relative, path, size) for domain in ("code", "prose")]
        elif _read_text(path) is not None:
            entries.append(CorpusEntry("data", relative, path, size))
    return tuple(entries)


def _order(entry: CorpusEntry) -> tuple[str, int]:
    return entry.key, DOMAINS.index(entry.domain)


@functools.cache
def _split_entries() -> dict[str, list[CorpusEntry]]:
    """Entries split by the hash of their key; each domain keeps at least MIN_HELDOUT_ENTRIES held out."""
    heldout: set[CorpusEntry] = set()
    for domain in DOMAINS:
        ranked = sorted((e for e in _all_entries() if e.domain == domain), key=lambda e: heldout_score(e.key))
        chosen = [e for e in ranked if is_heldout(e.key)]
        heldout.update(chosen if len(chosen) >= MIN_HELDOUT_ENTRIES else ranked[:MIN_HELDOUT_ENTRIES])
    ordered = sorted(_all_entries(), key=_order)
    return {
        "train": [entry for entry in ordered if entry not in heldout],
        "heldout": [entry for entry in ordered if entry in heldout],
    }
