"""docs/api.md stays true to the code.

The page's format (see the comment at its top): each entry is a heading "### `gateskip.x.y`"
followed by a ```python block with the signature as in the source; bullets that open with
code spans ("- `name`: ...") name parameters, fields or attributes of that entry. Here every
entry must import, its signature block must equal the source's (parameters, annotations,
defaults; for classes decorators, bases, fields and the listed methods), every bulleted name
must exist, and the main configuration dataclasses must have every field explained.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import gateskip
import gateskip.evaluation

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
HEADING = re.compile(r"^### `(gateskip(?:\.\w+)+)`$")
BULLET = re.compile(r"^- ((?:`\w+`(?:, | / | and )?)+):")
SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"^(gateskip(?:\.\w+)+)(\(.*\))?$")
FILE_SUFFIXES = (".safetensors", ".json", ".jsonl", ".md", ".png", ".yaml")  # file names, not import paths
# Dataclasses a user configures: each field needs its own explanation.
FULLY_EXPLAINED = (
    "gateskip.GateConfig", "gateskip.SkipPlan", "gateskip.training.TrainConfig", "gateskip.QuantileBudget",
    "gateskip.ThresholdBudget", "gateskip.FlopReport", "gateskip.evaluation.Sweep", "gateskip.evaluation.SweepSettings",
)


@dataclass
class Entry:
    path: str
    signature: str | None = None
    names: list[str] = field(default_factory=list)  # from the entry's bullets


def parse(text: str) -> tuple[list[Entry], list[str], list[str]]:
    """(entries, inline code spans outside code blocks, malformed level-3 headings)."""
    entries: list[Entry] = []
    spans: list[str] = []
    bad: list[str] = []
    current: Entry | None = None
    block: list[str] | None = None  # lines of the code block being read
    for line in text.splitlines():
        if block is not None:
            if line.startswith("```"):
                if current is not None and current.signature is None and block[0] == "python":
                    current.signature = "\n".join(block[1:])
                block = None
            else:
                block.append(line)
            continue
        if line.startswith("```"):
            block = [line[3:].strip()]
            continue
        spans += SPAN.findall(line)
        if line.startswith("### "):
            m = HEADING.match(line)
            current = Entry(m.group(1)) if m else None
            if m:
                entries.append(current)
            else:
                bad.append(line)
        elif line.startswith("## "):
            current = None
        elif current is not None and (m := BULLET.match(line)):
            current.names += re.findall(r"`(\w+)`", m.group(1))
    return entries, spans, bad


ENTRIES, SPANS, BAD_HEADINGS = parse(re.sub(r"<!--.*?-->", "", DOC.read_text(), flags=re.S))


def resolve(path: str):
    """Import the longest module prefix of a dotted path, then walk the attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def source_node(obj) -> ast.stmt:
    return ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]


def dump(node) -> str:
    return "" if node is None else ast.dump(node)


def dumps(nodes) -> list[str]:
    return [ast.dump(n) for n in nodes]


def by_name(body: list[ast.stmt]) -> tuple[dict[str, ast.AnnAssign], dict[str, ast.FunctionDef]]:
    fields = {n.target.id: n for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    funcs = {n.name: n for n in body if isinstance(n, ast.FunctionDef)}
    return fields, funcs


def self_attributes(cls_node: ast.ClassDef) -> set[str]:
    """Names assigned as self.X anywhere in the class (instance attributes)."""
    return {n.attr for n in ast.walk(cls_node)
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


def check_function(doc: ast.FunctionDef, src: ast.FunctionDef, where: str) -> None:
    assert dump(doc.args) == dump(src.args), f"{where}: documented parameters differ from the source"
    assert dump(doc.returns) == dump(src.returns), f"{where}: documented return annotation differs from the source"


def check_class(doc: ast.ClassDef, src: ast.ClassDef, obj: type, path: str) -> None:
    assert dumps(doc.decorator_list) == dumps(src.decorator_list), f"{path}: class decorators differ"
    assert dumps(doc.bases) == dumps(src.bases), f"{path}: base classes differ"
    src_fields, src_funcs = by_name(src.body)
    doc_fields, doc_funcs = by_name(doc.body)
    for stmt in doc.body:
        ok = isinstance(stmt, (ast.AnnAssign, ast.FunctionDef)) or (
            isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))
        assert ok, f"{path}: only fields, method signatures and '...' belong in the block"
    for name, node in doc_fields.items():
        assert name in src_fields, f"{path}.{name}: documented field is not in the source"
        assert dump(node.annotation) == dump(src_fields[name].annotation), f"{path}.{name}: annotation differs"
        assert dump(node.value) == dump(src_fields[name].value), f"{path}.{name}: default differs"
    if dataclasses.is_dataclass(obj):
        assert list(doc_fields) == list(src_fields), f"{path}: the block must list every field, in source order"
    for name, node in doc_funcs.items():
        assert name in src_funcs, f"{path}.{name}: documented method is not in the source"
        check_function(node, src_funcs[name], f"{path}.{name}")
        assert dumps(node.decorator_list) == dumps(src_funcs[name].decorator_list), f"{path}.{name}: decorators differ"


def test_page_has_entries_in_the_format():
    assert len(ENTRIES) > 50
    assert not BAD_HEADINGS, f"level-3 headings must be ### `gateskip.path`: {BAD_HEADINGS}"
    paths = [e.path for e in ENTRIES]
    assert len(paths) == len(set(paths)), "an entry is documented twice"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.path)
def test_entry_signature_matches_source(entry: Entry):
    obj = resolve(entry.path)
    assert entry.signature is not None, f"{entry.path}: no ```python signature block after the heading"
    doc_tree = ast.parse(entry.signature).body
    assert len(doc_tree) == 1, f"{entry.path}: the signature block holds one def or class"
    doc, src = doc_tree[0], source_node(obj)
    assert type(doc) is type(src), f"{entry.path}: documented as {type(doc).__name__}, is {type(src).__name__}"
    assert doc.name == src.name == entry.path.rsplit(".", 1)[1], f"{entry.path}: the block documents {doc.name}"
    if isinstance(src, ast.ClassDef):
        check_class(doc, src, obj, entry.path)
    else:
        check_function(doc, src, entry.path)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.names], ids=lambda e: e.path)
def test_bulleted_names_exist(entry: Entry):
    obj = resolve(entry.path)
    if inspect.isclass(obj):
        known = set(dir(obj)) | self_attributes(source_node(obj)) | set(inspect.signature(obj).parameters)
        if dataclasses.is_dataclass(obj):
            known |= {f.name for f in dataclasses.fields(obj)}
    else:
        known = set(inspect.signature(obj).parameters)
    missing = [n for n in entry.names if n not in known]
    assert not missing, f"{entry.path}: the doc describes {missing}, which it does not have"


@pytest.mark.parametrize("path", FULLY_EXPLAINED)
def test_every_config_field_is_explained(path: str):
    entry = next((e for e in ENTRIES if e.path == path), None)
    assert entry is not None, f"{path} is not documented"
    fields = [f.name for f in dataclasses.fields(resolve(path))]
    unexplained = [f for f in fields if f not in entry.names]
    assert not unexplained, f"{path}: fields without a bullet: {unexplained}"


def test_public_exports_are_documented():
    documented = set()
    for e in ENTRIES:
        try:
            documented.add(id(resolve(e.path)))
        except (ImportError, AttributeError):
            pass  # reported by test_entry_signature_matches_source
    for module in (gateskip, gateskip.evaluation):
        missing = [name for name in module.__all__ if id(getattr(module, name)) not in documented]
        assert not missing, f"{module.__name__} exports {missing} without an entry in docs/api.md"


def test_dotted_paths_in_prose_import():
    paths = {m.group(1) for s in SPANS if (m := DOTTED.match(s)) and not s.endswith(FILE_SUFFIXES)}
    assert len(paths) > 20
    broken = []
    for path in sorted(paths):
        try:
            resolve(path)
        except (ImportError, AttributeError):
            broken.append(path)
    assert not broken, f"docs/api.md names paths that do not exist: {broken}"


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_the_longer_docs_resolve():
    links = re.findall(r"\]\(([\w\-]+\.md)(?:#([\w\-]+))?\)", DOC.read_text())
    assert links
    for name, anchor in links:
        target = DOC.parent / name
        assert target.is_file(), f"docs/api.md links to a missing page {name}"
        if anchor:
            headings = {slug(line.lstrip("#")) for line in target.read_text().splitlines() if line.startswith("#")}
            assert anchor in headings, f"docs/api.md links to {name}#{anchor}, which has no such heading"
