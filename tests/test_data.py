"""The data pipeline: packing against a plain oracle, sharding, resuming, user formats and bad input."""

import collections
import itertools
import json
import math
import re
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vpmoe.tokenizer import get_tokenizer
from vpmoe.training.corpus import DOMAINS, MAX_DOCUMENT_CHARS
from vpmoe.training.data import (
    DataError,
    PackedDataset,
    is_heldout_document,
    unigram_cross_entropy,
    unigram_loss,
)

SEQ = 64
EOT = 199999

# Real English paragraphs (the Python reference manual as shipped with the interpreter), none tiny.
PARAGRAPHS = [p for text in topics.values() for p in text.split("\n\n") if 200 < len(p) < 1200]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """A folder with text files and a JSONL file in a subfolder, about 120 short documents in all."""
    for index, paragraph in enumerate(PARAGRAPHS[:20]):
        (tmp_path / f"doc{index:02d}.txt").write_text(paragraph, encoding="utf-8")
    (tmp_path / "more").mkdir()
    write_jsonl(tmp_path / "more" / "records.jsonl", [{"text": p} for p in PARAGRAPHS[20:120]])
    (tmp_path / "ignored.md").write_text("not data", encoding="utf-8")
    return tmp_path


def oracle_rows(dataset: PackedDataset, count: int) -> list[tuple[list[int], int]]:
    """Concatenate tokenised documents with <|endoftext|>, epoch after epoch, and chop with stride SEQ."""
    tok = get_tokenizer()
    stream: list[int] = []
    token_domains: list[int] = []
    for epoch in itertools.count():
        if len(stream) > count * SEQ:
            break
        for document in dataset.documents(epoch):
            ids = [*tok.encode(document.text), EOT]
            stream += ids
            token_domains += [dataset.domains.index(document.domain)] * len(ids)
    rows = []
    for i in range(count):
        votes = collections.Counter(token_domains[i * SEQ : (i + 1) * SEQ])
        majority = max(range(len(dataset.domains)), key=lambda d: (votes[d], -d))
        rows.append((stream[i * SEQ : i * SEQ + SEQ + 1], majority))
    return rows


def test_rows_match_the_oracle_across_epochs(mixed_folder):
    dataset = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=3)
    expected = oracle_rows(dataset, 160)
    rows = list(itertools.islice(dataset.packed_rows(), 160))
    assert [(row.tolist(), domain) for row, domain in rows] == expected
    assert all(row.dtype == np.int64 and row.shape == (SEQ + 1,) for row, _ in rows)
    assert set(dataset.domains) == {"jsonl", "txt"}


def test_row_shuffle_reorders_rows_within_its_buffer_and_is_seeded(mixed_folder):
    buffer = 16
    dataset = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=4, shuffle_rows=buffer)
    packed = [tuple(row.tolist()) for row, _ in itertools.islice(dataset.packed_rows(), 100 + buffer)]
    shuffled = [tuple(row.tolist()) for row, _ in itertools.islice(dataset.rows(), 100)]
    assert shuffled != packed[:100]
    # Row i can only be one of the first i + buffer packed rows, each used at most as often as it occurs.
    for i in range(1, 101):
        assert not collections.Counter(shuffled[:i]) - collections.Counter(packed[: i + buffer - 1])
    again = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=4, shuffle_rows=buffer)
    assert [tuple(row.tolist()) for row, _ in itertools.islice(again.rows(), 100)] == shuffled
    other = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=5, shuffle_rows=buffer)
    assert [tuple(row.tolist()) for row, _ in itertools.islice(other.rows(), 100)] != shuffled
    unshuffled = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=4, shuffle_rows=0)
    assert [tuple(row.tolist()) for row, _ in itertools.islice(unshuffled.rows(), 100)] == packed[:100]


def test_builtin_batches_mix_documents():
    """Without the row shuffle a batch of 8 rows is 8 windows of one long file; with it, rows come from
    many places in the stream."""
    dataset = PackedDataset(None, seq_length=128, seed=0)
    stream = itertools.islice(dataset.packed_rows(), 4096)
    packed = {tuple(row.tolist()): index for index, (row, _) in enumerate(stream)}
    batch = next(dataset.batches(8))
    positions = sorted(packed[tuple(row)] for row in np.concatenate([batch.tokens, batch.labels[:, -1:]], 1).tolist())
    assert positions[-1] - positions[0] > 100


def test_majority_domain_labels_rows_of_mixed_documents(tmp_path):
    write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"text": p, "domain": "odd" if i % 2 else "even"} for i, p in enumerate(PARAGRAPHS[:60])],
    )
    dataset = PackedDataset(str(tmp_path), seq_length=SEQ, seed=1)
    assert dataset.domains == ("even", "odd")
    expected = oracle_rows(dataset, 80)
    assert [(row.tolist(), domain) for row, domain in itertools.islice(dataset.packed_rows(), 80)] == expected
    assert {domain for _, domain in expected} == {0, 1}


def test_epochs_reshuffle_deterministically_and_splits_partition_the_documents(mixed_folder):
    train = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=0)
    heldout = PackedDataset(str(mixed_folder), split="heldout", seq_length=SEQ, seed=0)
    epoch0 = [document.text for document in train.documents(0)]
    assert epoch0 == [document.text for document in train.documents(0)]
    assert epoch0 != [document.text for document in train.documents(1)]
    other_seed = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=1)
    assert epoch0 != [document.text for document in other_seed.documents(0)]
    held = [document.text for document in heldout.documents(0)]
    assert held and collections.Counter(epoch0 + held) == collections.Counter(PARAGRAPHS[:120])
    assert train.describe()["documents"] == {"train": len(epoch0), "heldout": len(held)}


def test_labels_are_inputs_shifted_by_one(mixed_folder):
    dataset = PackedDataset(str(mixed_folder), seq_length=SEQ)
    rows = list(itertools.islice(dataset.rows(), 6))
    for step, batch in enumerate(itertools.islice(dataset.batches(3), 2)):
        table = np.stack([row for row, _ in rows[step * 3 : step * 3 + 3]])
        assert batch.tokens.tolist() == table[:, :-1].tolist()
        assert batch.labels.tolist() == table[:, 1:].tolist()
        assert batch.domains.tolist() == [domain for _, domain in rows[step * 3 : step * 3 + 3]]
        assert (batch.labels[:, :-1] == batch.tokens[:, 1:]).all()
        assert batch.first_row == step * 3
        assert batch.tokens.is_contiguous() and batch.labels.is_contiguous()


@pytest.mark.parametrize("start_row", [0, 5])
def test_ranks_together_consume_the_rows_of_one_process(mixed_folder, start_row):
    dataset = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=7)
    batch_size, world_size, steps = 2, 3, 4
    single = list(itertools.islice(dataset.batches(batch_size * world_size, start_row=start_row), steps))
    shards = [
        list(itertools.islice(dataset.batches(batch_size, start_row=start_row, rank=r, world_size=world_size), steps))
        for r in range(world_size)
    ]
    for step in range(steps):
        ranks = [shards[r][step] for r in range(world_size)]
        assert np.concatenate([b.tokens.numpy() for b in ranks]).tolist() == single[step].tokens.tolist()
        assert np.concatenate([b.domains.numpy() for b in ranks]).tolist() == single[step].domains.tolist()
        expected_first = start_row + step * batch_size * world_size
        assert [b.first_row for b in ranks] == [expected_first + r * batch_size for r in range(world_size)]


def test_restart_at_a_row_equals_skipping_to_it(mixed_folder):
    dataset = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=2)
    from_start = list(itertools.islice(dataset.rows(), 60))
    restarted = PackedDataset(str(mixed_folder), seq_length=SEQ, seed=2)
    resumed = list(itertools.islice(restarted.rows(start_row=37), 23))
    assert [(r.tolist(), d) for r, d in resumed] == [(r.tolist(), d) for r, d in from_start[37:]]
    batch = next(restarted.batches(4, start_row=37))
    assert batch.first_row == 37 and batch.tokens.tolist() == [r[:-1].tolist() for r, _ in from_start[37:41]]


def test_jsonl_and_parquet_with_a_text_field_and_domains(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": p, "domain": "manual"} for p in PARAGRAPHS[:40]])
    table = pa.table(
        {
            "body": [*PARAGRAPHS[40:100], None],
            "domain": ["reference"] * 30 + [None] * 31,
            "id": list(range(61)),
        }
    )
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=16)
    train = PackedDataset(str(tmp_path), seq_length=SEQ, text_field="body")
    heldout = PackedDataset(str(tmp_path), split="heldout", seq_length=SEQ, text_field="body")
    assert train.domains == ("manual", "parquet", "reference")
    documents = list(train.documents(0)) + list(heldout.documents(0))
    by_domain = collections.defaultdict(list)
    for document in documents:
        by_domain[document.domain].append(document.text)
    assert sorted(by_domain["manual"]) == sorted(PARAGRAPHS[:40])
    assert sorted(by_domain["reference"]) == sorted(PARAGRAPHS[40:70])
    assert sorted(by_domain["parquet"]) == sorted(PARAGRAPHS[70:100])
    rows = list(itertools.islice(train.rows(), 20))
    assert {domain for _, domain in rows} <= {0, 1, 2}
    assert train.describe()["text_field"] == "body"


def test_a_single_glob_or_file_source(mixed_folder):
    by_glob = PackedDataset(str(mixed_folder / "doc*.txt"), seq_length=SEQ)
    assert by_glob.describe()["files"] == 20
    single = PackedDataset(mixed_folder / "more" / "records.jsonl", seq_length=SEQ)
    assert single.describe()["files"] == 1 and single.domains == ("jsonl",)


def test_long_text_files_are_cut_into_documents_that_rebuild_the_file(tmp_path):
    text = "\n".join(PARAGRAPHS) + "\n"
    assert len(text) > 3 * MAX_DOCUMENT_CHARS
    assert is_heldout_document("manual.txt", 2)  # so that both splits have pieces
    (tmp_path / "manual.txt").write_text(text, encoding="utf-8")
    pieces = [*PackedDataset(str(tmp_path), seq_length=SEQ).documents(0)]
    pieces += PackedDataset(str(tmp_path), split="heldout", seq_length=SEQ).documents(0)
    pieces.sort(key=lambda document: int(document.source.split("#")[1]))
    assert "".join(document.text for document in pieces) == text
    assert all(len(document.text) <= MAX_DOCUMENT_CHARS for document in pieces)


def test_unigram_loss_is_the_entropy_of_the_labels(mixed_folder):
    dataset = PackedDataset(str(mixed_folder), seq_length=SEQ)
    labels = [token for row, _ in itertools.islice(dataset.rows(), 10) for token in row[1:].tolist()]
    counts = collections.Counter(labels)
    expected = -sum(c / len(labels) * math.log(c / len(labels)) for c in counts.values())
    assert unigram_loss(dataset, 10) == pytest.approx(expected, rel=1e-12)


def test_unigram_cross_entropy_scores_held_out_labels_with_smoothed_training_counts(mixed_folder):
    train = PackedDataset(str(mixed_folder), seq_length=SEQ)
    heldout = PackedDataset(str(mixed_folder), split="heldout", seq_length=SEQ)
    vocab = 201088
    fit = [token for row, _ in itertools.islice(train.rows(), 12) for token in row[1:].tolist()]
    scored = [token for row, _ in itertools.islice(heldout.rows(), 3) for token in row[1:].tolist()]
    counts = collections.Counter(fit)
    total = len(fit) + 0.5 * vocab
    expected = -sum(math.log((counts[token] + 0.5) / total) for token in scored) / len(scored)
    assert unigram_cross_entropy(train, 12, heldout, 3, vocab) == pytest.approx(expected, rel=1e-12)
    assert any(token not in counts for token in scored)  # unseen tokens are scored, not skipped
    with pytest.raises(ValueError, match="fit_rows and score_rows"):
        unigram_cross_entropy(train, 0, heldout, 3, vocab)


def test_builtin_corpus_rows_and_provenance():
    dataset = PackedDataset(None, split="heldout", seq_length=32, seed=0)
    assert dataset.domains == DOMAINS
    batch = next(dataset.batches(4))
    assert batch.tokens.shape == (4, 32) and batch.labels.shape == (4, 32)
    assert batch.domains.min() >= 0 and batch.domains.max() < len(DOMAINS)
    described = dataset.describe()
    assert described["source"] == "builtin" and described["split"] == "heldout" and described["seq_length"] == 32


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*does not exist"):
        PackedDataset(str(tmp_path / "nowhere"), seq_length=SEQ)
    with pytest.raises(DataError, match=r"\*\.jsonl matches no files"):
        PackedDataset(str(tmp_path / "*.jsonl"), seq_length=SEQ)
    (tmp_path / "readme.md").write_text("words", encoding="utf-8")
    with pytest.raises(DataError, match=r"no \.txt, \.jsonl, \.parquet files in folder"):
        PackedDataset(str(tmp_path), seq_length=SEQ)
    with pytest.raises(DataError, match=r"readme\.md is a \.md file"):
        PackedDataset(str(tmp_path / "readme.md"), seq_length=SEQ)


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text('\n{"text": "   "}\n', encoding="utf-8")
    with pytest.raises(DataError, match="no usable documents"):
        PackedDataset(str(tmp_path), seq_length=SEQ)


def test_non_utf8_text_files_are_skipped_with_a_warning(mixed_folder):
    latin1 = mixed_folder / "latin1.txt"
    latin1.write_bytes("Caf\xe9 cr\xe8me, ".encode("latin-1") * 50)
    with pytest.warns(UserWarning, match=r"latin1\.txt.*not UTF-8"):
        dataset = PackedDataset(str(mixed_folder), seq_length=SEQ)
    assert dataset.describe()["files"] == 21
    assert not any("latin1" in document.source for document in dataset.documents(0))


def test_only_non_utf8_text_is_an_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("na\xefve ".encode("latin-1") * 100)
    with pytest.warns(UserWarning, match="latin1.txt"), pytest.raises(DataError, match="no usable documents"):
        PackedDataset(str(tmp_path), seq_length=SEQ)


def test_jsonl_line_without_the_text_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": PARAGRAPHS[0]}, {"content": "x"}])
    escaped = re.escape(str(path))
    with pytest.raises(DataError, match=rf"{escaped} line 2 has no field 'text' \(fields: \['content'\]\)"):
        PackedDataset(str(path), seq_length=SEQ)
    with pytest.raises(DataError, match=rf"{escaped} line 1 has no field 'body'"):
        PackedDataset(str(path), seq_length=SEQ, text_field="body")


def test_jsonl_line_that_is_not_json_or_not_text(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"text": PARAGRAPHS[0]}) + "\n\n{not json}\n", encoding="utf-8")
    escaped = re.escape(str(path))
    with pytest.raises(DataError, match=rf"{escaped} line 3 is not valid JSON"):
        PackedDataset(str(path), seq_length=SEQ)
    write_jsonl(path, [{"text": 42}])
    with pytest.raises(DataError, match=rf"{escaped} line 1 field 'text' is a int, expected a string"):
        PackedDataset(str(path), seq_length=SEQ)
    write_jsonl(path, [[PARAGRAPHS[0]]])
    with pytest.raises(DataError, match=rf"{escaped} line 1 is a JSON list, expected an object"):
        PackedDataset(str(path), seq_length=SEQ)


def test_parquet_without_the_column(tmp_path):
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"content": PARAGRAPHS[:5], "id": list(range(5))}), path)
    escaped = re.escape(str(path))
    with pytest.raises(DataError, match=rf"{escaped} has no column 'text' \(columns: \['content', 'id'\]\)"):
        PackedDataset(str(path), seq_length=SEQ)


def test_a_split_with_no_documents_is_explained(tmp_path):
    assert not is_heldout_document("essay.txt", 0)
    (tmp_path / "essay.txt").write_text(PARAGRAPHS[0], encoding="utf-8")
    assert next(PackedDataset(str(tmp_path), seq_length=SEQ).rows())[0][-1] >= 0
    with pytest.raises(DataError, match=r"no heldout documents in .*1 train / 0 held out"):
        PackedDataset(str(tmp_path), split="heldout", seq_length=SEQ)


def test_bad_arguments(mixed_folder):
    with pytest.raises(ValueError, match="split"):
        PackedDataset(str(mixed_folder), split="test", seq_length=SEQ)
    dataset = PackedDataset(str(mixed_folder), seq_length=SEQ)
    with pytest.raises(ValueError, match="rank"):
        next(dataset.batches(2, rank=2, world_size=2))
    with pytest.raises(ValueError, match="start_row"):
        dataset.rows(-1)
