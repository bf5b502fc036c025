"""Training text: sources, tokenization with loss masks, packing, padding, a deterministic split."""

import gzip
import json
import string

import datasets
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gateskip.errors import GateSkipError
from gateskip.data.textdata import IGNORE
from gateskip.data.textdata import build_blocks, bundled_documents, pack, read_documents, split, tokenize

CHARS = string.ascii_letters + string.digits + " .,;:!?'\"-()\n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (ids < 80), so tiny models with a vocabulary of ~100 can train on text."""
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def test_plain_text_file_is_one_document_with_loss_everywhere(tmp_path):
    (tmp_path / "a.txt").write_text("To be, or not to be.")
    docs = read_documents(str(tmp_path / "a.txt"))
    assert docs == [[("To be, or not to be.", True)]]
    [(ids, labels)] = tokenize(docs, char_tokenizer())
    assert len(ids) == len("To be, or not to be.") + 1 and ids[-1] == 2  # EOS closes the document
    assert labels == ids


def test_jsonl_prompt_response_puts_loss_on_the_response_only(tmp_path):
    path = tmp_path / "qa.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"prompt": "Q: 2+2? ", "response": "A: 4"}) + "\n\n")
        f.write(json.dumps({"text": "plain"}) + "\n")
    docs = read_documents(str(path))
    [(ids, labels), (ids2, labels2)] = tokenize(docs, char_tokenizer())
    n_prompt = len("Q: 2+2? ")
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert labels2 == ids2


def test_saved_hf_dataset_folder_is_read(tmp_path):
    datasets.Dataset.from_dict({"text": ["one doc", "two doc"]}).save_to_disk(str(tmp_path / "ds"))
    assert [d[0][0] for d in read_documents(str(tmp_path / "ds"))] == ["one doc", "two doc"]


def test_packing_cuts_the_stream_into_full_blocks_and_keeps_labels_aligned():
    token_docs = [([5, 6, 7], [IGNORE, 6, 7]), ([8, 9, 10, 11], [8, 9, 10, 11])]
    blocks = pack(token_docs, seq_len=3)
    assert blocks.input_ids.tolist() == [[5, 6, 7], [8, 9, 10]]
    assert blocks.labels.tolist() == [[IGNORE, 6, 7], [8, 9, 10]]
    assert blocks.attention_mask.all()


def test_unpacked_documents_are_right_padded_with_no_loss_on_padding(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text("abc")
    (tmp_path / "d" / "2.txt").write_text("abcdefgh")
    train, val = build_blocks([str(tmp_path / "d")], char_tokenizer(), seq_len=6, packed=False, val_fraction=0.0)
    assert train.attention_mask.sum(1).sort().values.tolist() == [4, 6]  # "abc"+EOS, and a truncated doc
    assert (train.labels[train.attention_mask == 0] == IGNORE).all()
    assert len(val) == 0


def test_split_is_deterministic_and_disjoint(tmp_path):
    (tmp_path / "t.txt").write_text(CHARS * 20)
    a_train, a_val = build_blocks([str(tmp_path / "t.txt")], char_tokenizer(), seq_len=16, val_fraction=0.2, seed=3)
    b_train, b_val = build_blocks([str(tmp_path / "t.txt")], char_tokenizer(), seq_len=16, val_fraction=0.2, seed=3)
    assert torch.equal(a_val.input_ids, b_val.input_ids) and torch.equal(a_train.input_ids, b_train.input_ids)
    n = len(a_train) + len(a_val)
    assert len(a_val) == round(0.2 * n)
    _, c_val = split(pack(tokenize(read_documents(str(tmp_path / "t.txt")), char_tokenizer()), 16), 0.2, seed=4)
    assert not torch.equal(a_val.input_ids, c_val.input_ids)


def test_bundled_text_is_shakespeare_and_offline():
    docs = bundled_documents()
    assert len(docs) > 30
    assert any("Prospero" in doc[0][0] for doc in docs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing.txt"), "not found"),
        (lambda p: (p / "empty.txt").write_text("  \n") and str(p / "empty.txt"), "holds no text"),
        (lambda p: (p / "bad.jsonl").write_text('{"title": 1}\n') and str(p / "bad.jsonl"), "'text' field"),
    ],
)
def test_bad_sources_give_clear_errors(tmp_path, make, message):
    with pytest.raises(GateSkipError, match=message):
        build_blocks([make(tmp_path)], char_tokenizer(), seq_len=8)


def test_too_little_text_for_one_block_is_an_error(tmp_path):
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(GateSkipError, match="fewer than one block"):
        build_blocks([str(tmp_path / "short.txt")], char_tokenizer(), seq_len=64)


def test_max_tokens_stops_reading_early(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("abcdefghij")
    token_docs = tokenize(read_documents(str(tmp_path)), char_tokenizer(), max_tokens=15)
    assert [len(ids) for ids, _ in token_docs] == [11, 4]
