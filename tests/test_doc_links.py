"""Every link from the documentation into the code lands on what it names, checked with ``ast``.

A link ``[`text`](../path.py#L123)`` in ``docs/*.md`` or ``README.md`` is one of two kinds:

* **a function or class**: ``text`` is its name (``batchnorm_forward``, ``def batchnorm_forward(``,
  ``class Trainer``): line 123 is the ``def``/``class`` line of that name;
* **a statement**: ``text`` is the whole statement (blanks aside; for a compound statement, its
  header): a statement of that text starts on line 123. A comment, a blank line or another
  statement there fails.

And a statement lands inside the right function: after a link to a function of the same file in
the same section (between two headings), its statement links must lie inside that function; with
no such link, a statement that occurs in more than one function of the file is ambiguous and fails.
Relative links without a line (files, folders, other docs) must exist.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

CODE_LINK = re.compile(r"\[`([^`]+)`\]\(([^)#\s]+\.py)#L(\d+)\)")
RELATIVE_LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)#\s]+)(?:#[^)\s]*)?\)")
HEADING = re.compile(r"^#{1,6} ", re.MULTILINE)
FENCED_BLOCK = re.compile(r"^```.*?^```$", re.MULTILINE | re.DOTALL)
NAME_LINK = re.compile(r"^(?:(?:async )?def |class )?([A-Za-z_]\w*)\(?:?$")


@dataclass(frozen=True)
class Link:
    document: Path
    section: int  # index of the heading-delimited section
    text: str
    target: Path
    line: int

    def __str__(self) -> str:
        return f"{shown(self.document)}: [`{self.text}`]({shown(self.target)}#L{self.line})"


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def prose(text: str) -> str:
    """``text`` with its fenced blocks blanked out (same length and lines): links and headings live
    in the prose, and a ``# comment`` in a code block is no heading."""
    return FENCED_BLOCK.sub(lambda block: re.sub(r"[^\n]", " ", block.group()), text)


def code_links(document: Path) -> list[Link]:
    text = prose(document.read_text(encoding="utf-8"))
    starts = [0] + [m.start() for m in HEADING.finditer(text)]
    links = []
    for match in CODE_LINK.finditer(text):
        section = sum(start <= match.start() for start in starts) - 1
        target = (document.parent / match.group(2)).resolve()
        links.append(Link(document, section, match.group(1), target, int(match.group(3))))
    return links


def normalized(code: str) -> str:
    return re.sub(r"\s+", "", code)


@functools.cache
def parsed(path: Path) -> tuple[str, ast.Module]:
    source = path.read_text(encoding="utf-8")
    return source, ast.parse(source)


def definitions(path: Path) -> list[ast.AST]:
    return [
        node
        for node in ast.walk(parsed(path)[1])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]


def statement_text(source: str, node: ast.stmt) -> str:
    """A simple statement's source; a compound statement's header (up to the colon of its first line)."""
    segment = ast.get_source_segment(source, node) or ""
    if hasattr(node, "body"):
        first_body = node.body[0].lineno if node.body else node.lineno
        lines = source.splitlines()[node.lineno - 1 : first_body - 1] or [segment.splitlines()[0]]
        header = "\n".join(lines).strip()
        return header[: header.rfind(":") + 1] if ":" in header else header
    return segment


def enclosing_function(path: Path, line: int) -> str | None:
    """The innermost function or class whose body holds ``line``."""
    inner = None
    for node in definitions(path):
        if node.lineno < line <= node.end_lineno and (inner is None or node.lineno > inner.lineno):
            inner = node
    return inner.name if inner else None


def statements_matching(path: Path, text: str) -> list[ast.stmt]:
    source, tree = parsed(path)
    want = normalized(text)
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.stmt) and normalized(statement_text(source, node)) == want
    ]


def link_problem(link: Link, context: str | None) -> str | None:
    """What is wrong with ``link`` (None if nothing); ``context`` is the function its section names."""
    if not link.target.is_file():
        return "no such file"
    name = NAME_LINK.match(link.text)
    named = [node for node in definitions(link.target) if name and node.name == name.group(1)]
    if named:
        if any(node.lineno == link.line for node in named):
            return None
        return f"{link.text!r} is defined on line {', '.join(str(n.lineno) for n in named)}"
    matches = statements_matching(link.target, link.text)
    here = [node for node in matches if node.lineno == link.line]
    if not here:
        lines = parsed(link.target)[0].splitlines()
        found = lines[link.line - 1].strip() if 1 <= link.line <= len(lines) else "(past the end)"
        where = ", ".join(f"L{node.lineno} in {enclosing_function(link.target, node.lineno)}" for node in matches)
        return f"line {link.line} is {found!r}, not that statement" + (f" (it is at {where})" if where else "")
    inside = enclosing_function(link.target, link.line)
    if context is not None and inside != context:
        return f"the section links to {context}, but line {link.line} is inside {inside}"
    functions = {enclosing_function(link.target, node.lineno) for node in matches}
    if context is None and len(functions) > 1:
        return f"the statement occurs in {sorted(map(str, functions))}: link the function first, in the same section"
    return None


def link_problems(document: Path) -> list[str]:
    problems, context = [], {}
    for link in code_links(document):
        key = (link.section, link.target)
        problem = link_problem(link, context.get(key))
        if problem:
            problems.append(f"{link}: {problem}")
        name = NAME_LINK.match(link.text)
        if name and link.target.is_file() and any(node.name == name.group(1) for node in definitions(link.target)):
            context[key] = name.group(1)
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_code_links_land_on_what_they_name(document):
    problems = link_problems(document)
    assert not problems, "code links that miss:\n" + "\n".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_relative_links_exist(document):
    text = prose(document.read_text(encoding="utf-8"))
    missing = [target for target in RELATIVE_LINK.findall(text) if not (document.parent / target).exists()]
    assert not missing, f"{document.name} links to missing files: {missing}"


def test_the_checker_refuses_a_comment_another_function_and_an_ambiguous_statement(tmp_path):
    """The three ways today's section 1 of the derivation went wrong, each caught."""
    code = tmp_path / "code.py"
    code.write_text(
        "def forward(x):\n"  # 1
        "    y = x + 1\n"  # 2
        "    return y\n"  # 3
        "\n"
        "\n"
        "def backward(d):\n"  # 6
        "    # y = x + 1\n"  # 7
        "    y = x + 1\n"  # 8
        "    return d\n"  # 9
    )
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# one\n[`forward`](code.py#L1) [`y = x + 1`](code.py#L2) [`return y`](code.py#L3)\n"
        "# two\n[`forward`](code.py#L6)\n"
        "# three\n[`forward`](code.py#L1) [`y = x + 1`](code.py#L7)\n"
        "# four\n[`forward`](code.py#L1) [`y = x + 1`](code.py#L8)\n"
        "# five\n[`y = x + 1`](code.py#L2)\n"
    )
    problems = link_problems(doc)
    assert len(problems) == 4, problems
    assert "'forward' is defined on line 1" in problems[0]
    assert "line 7 is '# y = x + 1', not that statement" in problems[1]
    assert "links to forward, but line 8 is inside backward" in problems[2]
    assert "occurs in ['backward', 'forward']" in problems[3]
