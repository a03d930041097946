"""o200k Harmony tokenizer: offline construction, Harmony ids, round trips, and o200k agreement."""

import gzip
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
from tiktoken_ext import openai_public

from vpmoe.tokenizer import (
    O200K_SHA256,
    HarmonyTokenizer,
    VocabularyError,
    bundled_vocab_path,
    get_tokenizer,
    harmony_special_tokens,
)

ROUND_TRIP_TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln — naïve café, 東京タワー, Ελληνικά, emoji 🙂🚀, \u200bzero-width",
    "def f(x):\n\treturn x ** 2  # square\n\n\n",
    "   leading and trailing spaces   \r\n",
    "<|start|>user<|message|>markup as plain text<|end|>",
]

# Computed once from this tokenizer and identical to bpe-openai's independent o200k_base: a regression anchor.
FOX_IDS = [976, 4853, 19705, 68347, 65613, 1072, 290, 29082, 6446, 13]

OFFLINE_SCRIPT = """
import json, socket

def no_network(*args, **kwargs):
    raise OSError("network disabled in this test")

socket.socket.connect = no_network
socket.create_connection = no_network
socket.getaddrinfo = no_network

from vpmoe.tokenizer import get_tokenizer

tok = get_tokenizer()
texts = json.loads({texts!r})
print(json.dumps({{
    "n_vocab": tok.n_vocab,
    "eot_id": tok.eot_id,
    "markup": tok.encode("<|start|>user<|message|>Hello<|end|>", allow_special=True),
    "round_trips": [tok.decode(tok.encode(text)) == text for text in texts],
    "fox": tok.encode("The quick brown fox jumps over the lazy dog."),
}}))
"""


@pytest.fixture(scope="module")
def tok() -> HarmonyTokenizer:
    return get_tokenizer()


def test_builds_offline_in_a_process_without_network(tmp_path):
    empty_cache = tmp_path / "tiktoken-cache"
    empty_cache.mkdir()
    dead_proxy = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(empty_cache),
        "HTTP_PROXY": dead_proxy,
        "HTTPS_PROXY": dead_proxy,
        "http_proxy": dead_proxy,
        "https_proxy": dead_proxy,
    }
    script = OFFLINE_SCRIPT.format(texts=json.dumps(ROUND_TRIP_TEXTS))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n_vocab"] == 201088
    assert result["eot_id"] == 199999
    markup = result["markup"]
    assert markup[0] == 200006 and markup[2] == 200008 and markup[-1] == 200007
    assert len(markup) == 5  # "user" and "Hello" are one token each
    assert all(result["round_trips"])
    assert result["fox"] == FOX_IDS
    assert list(empty_cache.iterdir()) == []


def test_harmony_ids_of_every_named_token(tok):
    named = {
        "<|endoftext|>": 199999,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
    }
    for text, token_id in named.items():
        assert tok.encode(text, allow_special=True) == [token_id]
        assert tok.token_text(token_id) == text
    assert tok.encode("<|reserved_200100|>", allow_special=True) == [200100]


def test_special_tokens_cover_every_id_above_the_bpe_ranks_once():
    specials = harmony_special_tokens()
    assert sorted(specials.values()) == list(range(199998, 201088))


def test_special_tokens_match_tiktoken_o200k_harmony_where_it_defines_them():
    """tiktoken's own o200k_harmony definition is the oracle (run with its download replaced by no ranks);
    it gives id 200018 two names, of which this tokenizer keeps the real one."""
    harmony = getattr(openai_public, "o200k_harmony", None)
    if harmony is None:
        pytest.skip("this tiktoken has no o200k_harmony definition")
    base = _offline(openai_public.o200k_base, load_tiktoken_bpe=lambda *args, **kwargs: {})
    theirs = _offline(harmony, o200k_base=base)()["special_tokens"]
    assert {name: i for name, i in theirs.items() if name != "<|reserved_200018|>"} == harmony_special_tokens()


def _offline(definition: types.FunctionType, **replaced: object) -> types.FunctionType:
    """A copy of a tiktoken definition whose module globals have some names replaced."""
    return types.FunctionType(definition.__code__, {**vars(openai_public), **replaced})


def test_markup_is_plain_text_unless_allowed(tok):
    text = "<|start|>user<|message|>Hello<|end|>"
    plain = tok.encode(text)
    assert not any(token_id >= 199998 for token_id in plain)
    assert tok.decode(plain) == text
    assert tok.encode_batch([text, "hello world"]) == [plain, tok.encode("hello world")]


def test_agrees_with_bpe_openai_o200k_base(tok):
    """bpe-openai's Rust o200k_base implementation is an independent oracle for ordinary text."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # bpe-openai's own use of importlib.resources
        import bpe_openai

        oracle = bpe_openai.get_encoding("o200k_base")
    for text in ROUND_TRIP_TEXTS:
        assert tok.encode(text) == oracle.encode_ordinary(text), text


def test_common_words_are_one_token_and_decode_back(tok):
    for word in ["hello", " world", " the", "def", " return"]:
        ids = tok.encode(word)
        assert len(ids) == 1, word
        assert tok.token_text(ids[0]) == word
    assert tok.encode("hello world") == tok.encode("hello") + tok.encode(" world")


def test_token_text_replaces_partial_utf8(tok):
    partial = tok.encode("🙂")
    assert tok.decode(partial) == "🙂"
    assert all(isinstance(tok.token_text(token_id), str) for token_id in partial)


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    for bad in (-1, 201088, 10**9):
        with pytest.raises(ValueError, match=rf"{bad}.*0\.\.201087"):
            tok.decode([1, bad])
    with pytest.raises(ValueError, match="201088"):
        tok.token_text(201088)


def test_missing_vocabulary_file_names_it_and_the_digest(tmp_path):
    missing = tmp_path / "o200k_base.tiktoken.gz"
    with pytest.raises(VocabularyError, match=O200K_SHA256) as raised:
        HarmonyTokenizer(missing)
    assert str(missing) in str(raised.value)


def test_corrupt_vocabulary_files_are_refused(tmp_path):
    not_gzip = tmp_path / "not-gzip.tiktoken.gz"
    not_gzip.write_bytes(b"plain bytes")
    tampered = tmp_path / "tampered.tiktoken.gz"
    original = gzip.decompress(bundled_vocab_path().read_bytes())
    tampered.write_bytes(gzip.compress(original.replace(b" 199997\n", b" 199996\n")))
    for path in (not_gzip, tampered):
        with pytest.raises(VocabularyError, match=O200K_SHA256) as raised:
            HarmonyTokenizer(path)
        assert str(path) in str(raised.value)


def test_bundled_vocabulary_is_found_in_the_bpe_openai_package():
    path = bundled_vocab_path()
    assert path.is_file() and path.name == "o200k_base.tiktoken.gz"
    assert "bpe_openai" in path.parts
