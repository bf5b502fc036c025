"""The default gate-training text holds no item of any bundled evaluation task.

The rule. Text is compared as lower-case word tokens (NFKC, letters and digits, plus the
arithmetic signs + * / = × ÷ ^ % < >; other punctuation and all spacing are ignored), so a
copy with other line breaks, quotes or capitals is still found. Every evaluation item gives
(prompt, gold answer) pairs: the question or context (for MMLU, ARC, PIQA, basic arithmetic:
the question; HellaSwag: the context; WinoGrande: the sentence up to the blank filled with the
right option; LAMBADA/perplexity: the passage without its last word; GSM8K: the question and
each block of the few-shot prompt; HumanEval: the prompt and canonical body, and the tests;
MBPP: the problem and reference program, and the asserts) and the correct choice or target. From each pair:
- the prompt alone and the answer alone are checked if they have >= 8 tokens (a short answer
  such as "yes", "4" or "Paris" says nothing on its own);
- the prompt followed by the answer is always checked (>= 4 tokens): this is what catches
  "Calculate 5 + 91 = 96" or a short MMLU question with its answer.
A checked text of up to 13 tokens must occur whole in the training text; a longer one is
flagged if any 13-token window of it that holds a word occurs (the GPT-3 paper's 13-gram rule),
so a passage copied in part is found too. A window of numbers and signs alone says nothing about
an item: "0 1 2 ... 12" or a row of asterisks occurs in much of the standard library's source.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from gateskip.data import corpus
from gateskip.evaluation.tasks import BUNDLED_TASKS, MMLU_DIR, data_root
from gateskip.data.textdata import read_documents

WINDOW = 13      # tokens: longer texts are checked window by window
ALONE = 8        # tokens a prompt or an answer needs to be checked on its own
COMBINED = 4     # tokens a prompt + answer needs to be checked at all
TOKEN = re.compile(r"[^\W_]+|[+*/=×÷^%<>]")

Pair = tuple[str, str]  # (prompt, gold answer)


def tokens(text: str) -> list[str]:
    return TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


# ---------------------------------------------------------------- evaluation items


def _hf(name: str) -> list[dict]:
    return load_from_disk(str(data_root() / "hf_datasets" / name / "validation")).to_list()


def _requests(path: str) -> Iterator[dict]:
    with gzip.open(data_root() / "oe_eval_tasks" / path / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _choice_items(name: str) -> Iterator[Pair]:
    for r in _hf(name):
        yield r["question"], r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag preprocessing (what the model is shown)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag() -> Iterator[Pair]:
    for r in _hf("hellaswag/none"):
        ending = r["endings"][int(r["label"])]
        yield r["ctx"], ending
        yield _hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"), _hellaswag_clean(ending)


def piqa() -> Iterator[Pair]:
    for r in _hf("piqa/plain_text"):
        yield r["goal"], r[f"sol{int(r['label']) + 1}"]


def winogrande() -> Iterator[Pair]:
    for r in _hf("winogrande/winogrande_xl"):
        before, after = r["sentence"].split("_", 1)
        yield before + r["option" + r["answer"]], after


def mmlu() -> Iterator[Pair]:
    """Every subject; the test split the task scores, and dev (its few-shot examples) and validation too."""
    for subject in sorted((data_root() / MMLU_DIR).iterdir()):
        for split in ("test", "dev", "validation"):
            if (subject / split).is_dir():
                for r in load_from_disk(str(subject / split)).to_list():
                    yield r["question"], r["choices"][int(r["answer"])]


def lambada() -> Iterator[Pair]:
    for r in _requests("lambada/bpb_0shot"):
        yield r["request"]["context"], r["request"]["continuation"]


def gsm8k() -> Iterator[Pair]:
    shots: set[str] = set()
    for r in _requests("gsm8k/gold_bpb_5shot"):
        doc = r["doc"]
        yield doc["question"], doc["answer"]
        yield doc["question"], doc["choices"][0]
        shots.update(r["request"]["context"].split("\n\n"))
    yield from ((block, "") for block in sorted(shots))


def humaneval() -> Iterator[Pair]:
    """The prompt (signature and docstring) with the canonical body, and the tests alone."""
    for r in _requests("codex_humaneval/gold_bpb_0shot"):
        doc = r["doc"]
        yield doc["prompt"], doc["canonical_solution"]
        yield doc["test"], ""


def mbpp() -> Iterator[Pair]:
    """The problem statement with the reference program, and its asserts."""
    for r in _requests("codex_mbpp/gold_bpb_0shot"):
        doc = r["doc"]
        yield doc["text"], doc["code"]
        yield "\n".join(doc["test_list"] + doc["challenge_test_list"]), ""


TASK_ITEMS: dict[str, Callable[[], Iterator[Pair]]] = {
    "arc_easy": lambda: _choice_items("ai2_arc/ARC-Easy"),
    "arc_challenge": lambda: _choice_items("ai2_arc/ARC-Challenge"),
    "piqa": piqa,
    "hellaswag": hellaswag,
    "winogrande": winogrande,
    "mmlu": mmlu,
    "lambada": lambada,
    "perplexity": lambada,  # the same LAMBADA passages, scored whole
    "gsm8k": gsm8k,
    "basic_arithmetic": lambda: _choice_items("allenai/basic_arithmetic/none"),
    "humaneval": humaneval,
    "mbpp": mbpp,
}


def probes(pairs: dict[str, list[Pair]]) -> dict[tuple[str, ...], str]:
    """Token sequences to look for (see the module docstring) -> the task they come from."""
    out: dict[tuple[str, ...], str] = {}
    for task, items in pairs.items():
        for prompt, answer in items:
            p, a = tokens(prompt), tokens(answer)
            for seq, need in ((p, ALONE), (a, ALONE), (p + a, COMBINED)):
                if len(seq) >= need:
                    out.setdefault(tuple(seq), task)
    return out


# ---------------------------------------------------------------- the checker

PRIME = 1_000_003


def _hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit polynomial hash of each row of a (n, L) token-id array."""
    h = np.zeros(len(rows), dtype=np.uint64)
    for j in range(rows.shape[1]):
        h = h * np.uint64(PRIME) + rows[:, j].astype(np.uint64)
    return h


class TextIndex:
    """Documents as one stream of token ids (0 between documents, never in a probe), for
    finding where token sequences occur."""

    def __init__(self, documents: list[str]):
        self.vocab: dict[str, int] = {}
        ids: list[int] = []
        self.starts: list[int] = []
        for doc in documents:
            self.starts.append(len(ids))
            ids += [self.vocab.setdefault(t, len(self.vocab) + 1) for t in tokens(doc)]
            ids.append(0)
        self.ids = np.array(ids, dtype=np.int64)

    def find(self, sequences: dict[tuple[str, ...], str], limit: int = 20) -> list[tuple[str, str, int]]:
        """(label, the text found, document index) for up to `limit` sequences that occur:
        whole if up to WINDOW tokens, else any WINDOW-token window of them."""
        get = self.vocab.get
        names = sorted(set(sequences.values()))
        code = {name: i for i, name in enumerate(names)}
        rows: dict[int, list[list[int]]] = {}   # length -> token ids of whole sequences
        row_labels: dict[int, list[int]] = {}
        stream: list[int] = []                   # longer sequences, -1 after each
        stream_labels: list[int] = []
        for seq, label in sequences.items():
            ids = [get(t, -1) for t in seq]      # -1: a token the text lacks, so no match
            if len(ids) <= WINDOW:
                rows.setdefault(len(ids), []).append(ids)
                row_labels.setdefault(len(ids), []).append(code[label])
            else:
                stream += ids
                stream.append(-1)
                stream_labels += [code[label]] * (len(ids) + 1)
        groups = [(np.array(rows[n]), np.array(row_labels[n])) for n in rows]
        if stream:
            windows = np.lib.stride_tricks.sliding_window_view(np.array(stream), WINDOW)
            # a window of numbers and signs alone (a count 0 1 2 ..., a row of asterisks) says nothing
            wordy = np.array([False] + [any(c.isalpha() for c in t) for t in self.vocab])
            has_word = wordy[np.clip(windows, 0, None)].any(axis=1)
            groups.append((windows[has_word], np.array(stream_labels[: len(windows)])[has_word]))
        found: list[tuple[str, str, int]] = []
        inverse = {i: t for t, i in self.vocab.items()}
        for wanted, labels in groups:
            keep = wanted.min(axis=1) > 0
            wanted, labels, length = wanted[keep], labels[keep], wanted.shape[1]
            if len(self.ids) < length or not len(wanted):
                continue
            text = np.lib.stride_tricks.sliding_window_view(self.ids, length)
            text_h, wanted_h = _hashes(text), _hashes(wanted)
            order = np.argsort(wanted_h)
            wanted_h = wanted_h[order]
            for pos in np.flatnonzero(np.isin(text_h, wanted_h)):
                lo, hi = np.searchsorted(wanted_h, text_h[pos], "left"), np.searchsorted(wanted_h, text_h[pos], "right")
                for k in order[lo:hi]:
                    if np.array_equal(wanted[k], text[pos]):  # not a hash collision
                        doc = int(np.searchsorted(self.starts, pos, side="right")) - 1
                        found.append((names[labels[k]], " ".join(inverse[i] for i in text[pos]), doc))
                        break
                if len(found) >= limit:
                    return found
        return found


def _report(found: list[tuple[str, str, int]], documents: list[dict]) -> str:
    return "\n".join(f"{label}: '{text}' in a {documents[doc]['source']} document" for label, text, doc in found)


# ---------------------------------------------------------------- fixtures and tests


@pytest.fixture(scope="session")
def split() -> tuple[list[dict], list[dict]]:
    return corpus.split_documents(seed=0)


@pytest.fixture(scope="session")
def code_split() -> tuple[list[dict], list[dict]]:
    return corpus.split_documents(seed=0, sources=corpus.CODE_SOURCES)


SELF_ANSWERS = Path(__file__).parents[1] / "docs/results/long_form/self_answers"


@pytest.fixture(scope="session")
def self_answers() -> tuple[list[dict], list[dict]]:
    """The 0.5B model's own answers to standard-library stubs (experiments/long_form/self_answers.py):
    committed gate training and calibration text, so it is checked like the built text."""
    return tuple([json.loads(line) for line in gzip.open(SELF_ANSWERS / f"{side}.jsonl.gz", "rt")]
                 for side in ("train", "heldout"))


@pytest.fixture(scope="session")
def train_index(split) -> TextIndex:
    return TextIndex([r["text"] for r in split[0]])


@pytest.fixture(scope="session")
def evaluation_probes() -> dict[tuple[str, ...], str]:
    return probes({task: list(items()) for task, items in TASK_ITEMS.items()})


def test_every_bundled_task_is_checked():
    assert set(TASK_ITEMS) == set(BUNDLED_TASKS), "a bundled task without an item extractor here goes unchecked"


def test_every_task_yields_items(evaluation_probes):
    counts = {task: list(evaluation_probes.values()).count(task) for task in TASK_ITEMS if task != "perplexity"}
    assert all(n > 100 for n in counts.values()), counts


@pytest.mark.parametrize("text", ["split", "code_split", "self_answers"])
def test_training_and_heldout_text_hold_no_evaluation_item(text, evaluation_probes, request):
    """The default mix, the code text (the standard library's source) and the 0.5B model's own
    answers against every task, HumanEval and MBPP included."""
    split = request.getfixturevalue(text)
    rows = [dict(r, side="training") for r in split[0]] + [dict(r, side="held-out") for r in split[1]]
    found = TextIndex([r["text"] for r in rows]).find(evaluation_probes)
    assert not found, "evaluation items found:\n" + "\n".join(
        f"{label}: '{text}' in a {rows[doc]['side']} {rows[doc]['source']} document" for label, text, doc in found)


def test_the_checker_flags_inserted_items():
    """It can fail: an ARC question with its answer, reformatted, inside a passage; a LAMBADA
    passage's middle; a short MMLU question with its one-word answer; an MBPP reference program
    reindented in a source file. A lone short answer is
    not flagged (the rule)."""
    arc_q, arc_a = next(_choice_items("ai2_arc/ARC-Challenge"))
    passage = next(lambada())[0]
    short = next((q, a) for q, a in mmlu() if COMBINED <= len(tokens(q)) < ALONE and len(tokens(a)) <= 2)
    problem, program = next(mbpp())
    items = probes({"arc_challenge": [(arc_q, arc_a)], "lambada": [(passage, "")], "mmlu": [short],
                    "mbpp": [(problem, program)]})
    clean = "The river delta was formed over thousands of years by sediment carried downstream."
    docs = [
        clean,
        f"{clean}\n\nQUESTION:   {arc_q.upper()}\n  ANSWER: {arc_a}\n\nMore text follows.",
        "Some story. " + " ".join(passage.split()[5:5 + WINDOW + 2]) + " The end.",
        f"Quiz time. {short[0]} -- {short[1]}!",
        f"yes {short[1]} no",
        "# utils.py\n" + program.replace("\r\n", "\n").replace("    ", "\t") + "\n# end",  # reindented
    ]
    found = TextIndex(docs).find(items, limit=1000)
    assert {(label, doc) for label, _, doc in found} == {("arc_challenge", 1), ("lambada", 2), ("mmlu", 3), ("mbpp", 5)}


def test_heldout_text_is_disjoint_from_training_text(split, train_index):
    train, heldout = split
    assert len(heldout) > 100 and len(train) > 10 * len(heldout)
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert {r["source"] for r in heldout} == set(corpus.SOURCES)
    # No 13-token window of a held-out document occurs in the training text.
    windows = {tuple(tokens(r["text"])): "heldout" for r in heldout}
    found = train_index.find(windows)
    assert not found, "held-out text in the training text:\n" + _report(found, train)


def test_split_is_seeded_and_keeps_near_copies_on_the_training_side(monkeypatch):
    """Fake sources of 40 distinct documents each, plus two near-copies (one across sources) and
    a short piece of a document."""
    words = [f"w{i}" for i in range(1600)]
    docs = {name: [" ".join(words[20 * j: 20 * j + 20]) for j in range(40 * i, 40 * i + 40)] for i, name in enumerate("ab")}
    pairs = [(docs["a"][0], docs["a"][0] + " and more"), (docs["b"][3], docs["b"][3].upper())]
    docs["a"] += [copy for _, copy in pairs]
    piece = ", ".join(docs["a"][5].split()[3:9])  # 6 words of a document
    docs["b"].append(piece)
    monkeypatch.setattr(corpus, "SOURCES", ("a", "b"))
    monkeypatch.setattr(corpus, "source_documents", lambda name, seed=0: docs[name])
    seen_heldout: set[str] = set()
    for seed in range(20):
        train, heldout = corpus.split_documents(seed, heldout_fraction=0.25)
        assert corpus.split_documents(seed, heldout_fraction=0.25) == (train, heldout)
        assert sorted(r["text"] for r in train + heldout) == sorted(docs["a"] + docs["b"])
        held = {r["text"] for r in heldout}
        assert 10 <= len(held) <= 21
        for original, copy in pairs:  # never one in training and the other held out
            assert not ((original in held) ^ (copy in held))
        assert not (piece in held and docs["a"][5] not in held)
        seen_heldout |= held
    assert len(seen_heldout) > 50  # different seeds, different held-out documents


def test_built_files_are_training_data(tmp_path, split, monkeypatch):
    monkeypatch.setattr(corpus, "split_documents", lambda seed=0, **_: split)
    train_path = corpus.build_training_text(tmp_path / "train.jsonl.gz")
    heldout_path = corpus.build_heldout_text(tmp_path / "heldout.jsonl")
    assert [[(r["text"], True)] for r in split[0]] == read_documents(str(train_path))
    assert [[(r["text"], True)] for r in split[1]] == read_documents(str(heldout_path))


def test_cli_writes_both_files(tmp_path, split, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "split_documents", lambda seed=0, **_: split)
    assert corpus.main([str(tmp_path / "t.jsonl.gz"), "--heldout", str(tmp_path / "h.jsonl.gz")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(f"wrote {len(split[0])} documents")
    assert (tmp_path / "t.jsonl.gz").is_file() and (tmp_path / "h.jsonl.gz").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    run = subprocess.run([sys.executable, "-m", "gateskip.data.corpus", "train.txt"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr == "error: train.txt: the output must be a .jsonl or .jsonl.gz file (what gateskip train --data reads)\n"
    assert corpus.main([str(tmp_path / "t.jsonl.gz"), "--heldout", str(tmp_path / "t.jsonl.gz")]) == 2
    assert capsys.readouterr().err == "error: --heldout must name another file than the training text\n"
    assert not list(tmp_path.iterdir())  # nothing written, nothing built
    assert corpus.main([str(tmp_path / "t.jsonl.gz"), "--sources", "squad,python_stlib"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown source 'python_stlib'; choose from squad, coqa")
    assert not list(tmp_path.iterdir())


def test_code_text_is_the_standard_librarys_source(code_split):
    train, heldout = code_split
    assert {r["source"] for r in train + heldout} == {"python_stdlib"}
    assert len(train) > 500 and len(heldout) > 10
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert any("def " in r["text"] for r in train)
    sizes = sorted(len(r["text"]) for r in train)  # cut at blank lines into pieces of about 4,000 characters
    assert 1000 < sizes[len(sizes) // 2] < 2 * corpus.SHAKESPEARE_PIECE_CHARS


def test_self_answers_come_from_their_own_side_of_the_code_text(self_answers, code_split):
    """Each answer's prompt is a function stub from the standard library's source: the training
    answers' from the code text's training side, the held-out answers' from its held-out side."""
    stub = re.compile(r"```\n(def (\w+)\(.*?)\n```", re.S)
    for answers, side in ((self_answers[0], code_split[0]), (self_answers[1], code_split[1])):
        names = {stub.search(r["text"]).group(2) for r in answers}
        assert len(names) > 20
        assert all(any(f"def {n}(" in d["text"] for d in side) for n in names)
    held_stubs = {stub.search(r["text"]).group(1) for r in self_answers[1]}
    assert not any(s in r["text"] for r in self_answers[0] for s in held_stubs)
