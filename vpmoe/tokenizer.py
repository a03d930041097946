"""o200k Harmony tokenizer, built fully offline from the o200k_base ranks shipped in the bpe-openai wheel."""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import types
from collections.abc import Sequence
from pathlib import Path

import tiktoken
from tiktoken_ext import openai_public

N_VOCAB = 201088
N_BPE_RANKS = 199998
EOT_ID = 199999

# sha256 of the *decompressed* o200k_base.tiktoken text: the same digest tiktoken pins for the file it
# would download, so the two sources are provably the same vocabulary. (The .gz wrapper's own digest
# depends on gzip settings and is not checked.)
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

HARMONY_SPECIAL_IDS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": EOT_ID,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}


class VocabularyError(RuntimeError):
    """The o200k_base vocabulary file is missing, unreadable or not the expected file."""


def bundled_vocab_path() -> Path:
    """Where the bpe-openai wheel keeps o200k_base.tiktoken.gz (found without importing the package)."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or spec.origin is None:
        raise VocabularyError(
            "the bpe-openai package is not installed; it ships o200k_base.tiktoken.gz "
            f"(expected sha256 of its decompressed text {O200K_SHA256})"
        )
    return Path(spec.origin).parent / "data" / "o200k_base.tiktoken.gz"


def load_o200k_ranks(path: Path) -> dict[bytes, int]:
    """Read, verify (sha256) and parse a gzipped .tiktoken file: one 'base64-token rank' pair per line."""
    expectation = f"expected a gzipped o200k_base.tiktoken whose text has sha256 {O200K_SHA256}"
    try:
        text = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise VocabularyError(f"cannot read vocabulary file {path}: {error}; {expectation}") from error
    digest = hashlib.sha256(text).hexdigest()
    if digest != O200K_SHA256:
        raise VocabularyError(f"vocabulary file {path} has sha256 {digest}; {expectation}")
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != N_BPE_RANKS:
        raise VocabularyError(f"vocabulary file {path} has {len(ranks)} ranks, expected {N_BPE_RANKS}")
    return ranks


def o200k_pattern(ranks: dict[bytes, int]) -> str:
    """The o200k pre-tokenisation regex, read from tiktoken's own o200k_base definition without downloading.

    The definition is called with its loader swapped for one that returns our verified ranks, so the
    regex comes from tiktoken itself and its pinned digest is checked against ours.
    """

    def verified_ranks(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash != O200K_SHA256:
            raise VocabularyError(
                f"tiktoken pins o200k_base at sha256 {expected_hash}, this tokenizer at {O200K_SHA256}"
            )
        return ranks

    definition = openai_public.o200k_base
    offline_definition = types.FunctionType(
        definition.__code__, {**vars(openai_public), "load_tiktoken_bpe": verified_ranks}
    )
    return offline_definition()["pat_str"]


def harmony_special_tokens() -> dict[str, int]:
    """Every id from 199998 to 201087: the named Harmony tokens, the rest `<|reserved_NNNNNN|>`."""
    named_ids = set(HARMONY_SPECIAL_IDS.values())
    reserved = {f"<|reserved_{i}|>": i for i in range(N_BPE_RANKS, N_VOCAB) if i not in named_ids}
    return {**HARMONY_SPECIAL_IDS, **reserved}


class HarmonyTokenizer:
    """o200k Harmony: 199998 o200k_base BPE ranks plus special tokens up to id 201087."""

    n_vocab: int
    eot_id: int

    def __init__(self, vocab_path: Path | None = None) -> None:
        ranks = load_o200k_ranks(vocab_path or bundled_vocab_path())
        self._encoding = tiktoken.Encoding(
            name="o200k_harmony",
            pat_str=o200k_pattern(ranks),
            mergeable_ranks=ranks,
            special_tokens=harmony_special_tokens(),
            explicit_n_vocab=N_VOCAB,
        )
        self.n_vocab = self._encoding.n_vocab
        self.eot_id = EOT_ID

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; with allow_special, Harmony markup such as `<|start|>` becomes its special id.

        Without allow_special, markup is ordinary text, so user data can never inject control tokens.
        """
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each plain text (markup not parsed), encoded on tiktoken's thread pool."""
        return self._encoding.encode_ordinary_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        id_list = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        self._check_ids(id_list)
        return self._encoding.decode(id_list)

    def token_text(self, token_id: int) -> str:
        """A readable string for one id (its bytes decoded with errors='replace'), for dashboards."""
        self._check_ids([int(token_id)])
        return self._encoding.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            bad = next(i for i in ids if not 0 <= i < self.n_vocab)
            raise ValueError(f"token id {bad} is outside the vocabulary range 0..{self.n_vocab - 1}")


@functools.cache
def get_tokenizer() -> HarmonyTokenizer:
    """The process-wide HarmonyTokenizer, built on first use from the bundled vocabulary."""
    return HarmonyTokenizer()
