"""The built-in corpus: determinism, splits, domains, and what each domain's documents contain."""

import ast
import io
import itertools
import re
import sys
import tokenize

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpmoe.training.corpus import (
    DOMAINS,
    MAX_DOCUMENT_CHARS,
    Document,
    builtin_documents,
    builtin_entries,
    cut_lines,
    describe_builtin,
    module_docstrings,
    stdlib_root,
    strip_python_source,
)

# Words that English prose is full of and that are not Python keywords.
ENGLISH_FUNCTION_WORDS = {"the", "a", "an", "of", "to", "that", "this", "are", "be", "by", "which", "it", "on"}


@pytest.fixture(scope="module")
def heldout() -> list[Document]:
    return list(builtin_documents("heldout"))


def english_share(text: str) -> float:
    words = re.findall(r"[A-Za-z]+", text)
    return sum(word.lower() in ENGLISH_FUNCTION_WORDS for word in words) / max(1, len(words))


def without_docstrings(tree: ast.Module) -> ast.Module:
    """Plain oracle: drop each docstring statement from the tree; a body left empty gets `pass`."""
    for node in ast.walk(tree):
        documented = isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        if documented and node.body and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or ([] if isinstance(node, ast.Module) else [ast.Pass()])
    return tree


def test_document_order_is_deterministic_and_machine_independent():
    first = list(itertools.islice(builtin_documents("train"), 40))
    again = list(itertools.islice(builtin_documents("train"), 40))
    assert first == again
    keys = [entry.key for entry in builtin_entries("train")]
    assert keys == sorted(keys)
    root = str(stdlib_root())
    assert not any(key.startswith("/") or root in key for key in keys)


def test_every_domain_has_documents_in_both_splits(heldout):
    assert {document.domain for document in heldout} == set(DOMAINS)
    seen: set[str] = set()
    for document in builtin_documents("train"):
        seen.add(document.domain)
        if seen == set(DOMAINS):
            break
    assert seen == set(DOMAINS)


def test_splits_are_disjoint_and_documents_come_from_their_split(heldout):
    train = {(entry.domain, entry.key) for entry in builtin_entries("train")}
    held = {(entry.domain, entry.key) for entry in builtin_entries("heldout")}
    assert train and held and not train & held
    train_files = {key for _, key in train}
    for document in heldout:
        key = document.source.split("#")[0]
        assert (document.domain, key) in held
        assert key not in train_files  # a module's code and its docstrings go to the same split


def test_documents_are_capped_and_not_tiny(heldout):
    assert all(200 <= len(document.text) <= MAX_DOCUMENT_CHARS for document in heldout if "#" not in document.source)
    assert all(len(document.text) <= MAX_DOCUMENT_CHARS for document in heldout)


def test_code_documents_have_no_comments_or_docstrings(heldout):
    code = [document for document in heldout if document.domain == "code"]
    assert code
    for document in code:
        assert not any(line.lstrip().startswith("#") for line in document.text.splitlines()), document.source
        if "#" in document.source:
            continue  # a piece of a long file need not parse on its own
        tree = ast.parse(document.text)
        assert all(
            ast.get_docstring(node) is None
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ), document.source
        comments = [
            token
            for token in tokenize.generate_tokens(io.StringIO(document.text).readline)
            if token.type == tokenize.COMMENT
        ]
        assert not comments, document.source


def test_stripping_keeps_the_program_apart_from_docstrings():
    """On real library modules, the stripped source parses to the original tree minus its docstrings."""
    for entry in [entry for entry in builtin_entries("heldout") if entry.domain == "code"][:12]:
        source = entry.path.read_text(encoding="utf-8")
        expected = ast.dump(without_docstrings(ast.parse(source)))
        assert ast.dump(ast.parse(strip_python_source(source))) == expected, entry.key


def test_stripping_handles_one_line_bodies_and_look_alikes():
    source = (
        '#!/usr/bin/env python\n"""Module."""\nimport os  # why\n\n'
        'class A:\n    """Only a docstring."""\n\n'
        'def f(): "doc"; return 1\n\n'
        'def g():\n    s = """# not a comment\n    """\n    return s\n'
    )
    stripped = strip_python_source(source)
    assert stripped == (
        "import os\n\nclass A:\n    pass\n\ndef f(): pass; return 1\n\n"
        'def g():\n    s = """# not a comment\n    """\n    return s\n'
    )


def test_prose_documents_are_english_not_code(heldout):
    prose = [document for document in heldout if document.domain == "prose"]
    code = [document for document in heldout if document.domain == "code"]
    assert prose
    assert english_share("".join(document.text for document in prose)) > 0.15
    assert english_share("".join(document.text for document in code)) < 0.06
    assert all(english_share(document.text) > 0.05 for document in prose)


def test_module_docstrings_are_in_source_order():
    source = 'def b():\n    """Second."""\n\n"""Not a docstring."""\n\nclass C:\n    """Third."""\n'
    assert module_docstrings('"""First."""\n' + source) == "First.\n\nSecond.\n\nThird."


@given(st.lists(st.text(alphabet="ab \n", max_size=30), max_size=20), st.integers(min_value=1, max_value=25))
def test_cut_lines_covers_the_text_in_bounded_pieces(parts, limit):
    text = "".join(parts)
    lines = text.splitlines(keepends=True)
    pieces = list(cut_lines(lines, limit))
    assert "".join(pieces) == text
    assert all(0 < len(piece) <= limit for piece in pieces)
    short_lines = all(len(line) <= limit for line in lines)
    if short_lines:
        assert all(piece.endswith("\n") for piece in pieces[:-1])


def test_describe_builtin_reports_provenance():
    described = describe_builtin()
    assert described["python"] == sys.version.split()[0]
    assert described["stdlib"] == str(stdlib_root())
    assert set(described["domains"]) == set(DOMAINS)
    for counts in described["domains"].values():
        assert counts["train"]["entries"] > counts["heldout"]["entries"] > 0
        assert counts["train"]["source_bytes"] > 100_000
    assert described == describe_builtin()
    assert re.fullmatch("[0-9a-f]{64}", described["fingerprint"])
