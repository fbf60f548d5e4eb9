"""The documentation runs (``tests/doc_examples.py``): it is collected by the README's test command,
no Python block escapes by accident, the lines it quotes are the code's, and a drifted number fails."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from sybil.example import SybilFailure

from tests.doc_examples import DOC_PATTERNS, OUTPUT_LANGUAGE, ROOT, doc_sybil
from tests.test_doc_links import enclosing_function, statements_matching

DOCUMENTS = [path for pattern in DOC_PATTERNS for path in sorted(ROOT.glob(pattern))]
DERIVATION = ROOT / "docs" / "batchnorm_backward.md"
LAYERS = ROOT / "numpyside" / "layers.py"

FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
PYTHON_LIKE = re.compile(r"^(py|python\d?|pycon|ipython\d?|python-.*|py3)$", re.IGNORECASE)
SKIP = re.compile(r"<!--\s*skip:\s*(.*?)\s*-->")
#: A skip names its reason: ``next "why"``, ``start "why"`` (skipped always), or ``next if(condition,
#: reason="why")`` / ``start if(...)`` (skipped where the condition holds: an optional extra not
#: installed), closed by ``end``. Sybil's ``if(condition)`` without ``reason=`` would report only the
#: condition, so it is refused.
NAMED_SKIP = re.compile(r'^(next|start) "[^"]{8,}"$|^(next|start) if\(.+, reason="[^"]{8,}"\)$|^end$')


def test_the_readme_test_command_collects_every_doc():
    """``python -m pytest`` reads ``testpaths``; the repository's conftest hands these files to Sybil."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert {"tests", "docs", "README.md"} <= set(testpaths)
    sybil = doc_sybil()
    assert len(DOCUMENTS) >= 7
    assert all(sybil.should_parse(path) for path in DOCUMENTS)
    assert not sybil.should_parse(ROOT / "tests" / "test_docs.py")
    assert "pytest_collect_file = doc_sybil().pytest()" in (ROOT / "conftest.py").read_text()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_python_blocks_run_or_are_skipped_by_name(document):
    """A Python fence is ```python (it runs) or ```output (checked); no ```py that Sybil would pass
    over, and every skip says why."""
    text = document.read_text(encoding="utf-8")
    wrong = [language for language, _ in FENCE.findall(text) if PYTHON_LIKE.match(language) and language != "python"]
    assert not wrong, f"{document.name}: fences {wrong} would not run; write ```python or mark them skipped by name"
    unnamed = [skip for skip in SKIP.findall(text) if not NAMED_SKIP.match(skip)]
    assert not unnamed, (
        f'{document.name}: skips without a reason {unnamed}; write <!-- skip: next "fragment: why" --> '
        'or <!-- skip: start if(condition, reason="why") -->'
    )


@pytest.mark.parametrize(
    ("skip", "named"),
    [
        ('next "fragment: why it cannot run"', True),
        ("start if(find_spec('flax') is None, reason=\"Flax is optional: pip install -e '.[flax]'\")", True),
        ("end", True),
        ("next", False),
        ('next "short"', False),
        ("start if(find_spec('flax') is None)", False),
        ('start if(find_spec("flax") is None, reason="")', False),
    ],
)
def test_a_skip_is_named_only_with_a_reason(skip, named):
    assert bool(NAMED_SKIP.match(SKIP.findall(f"<!-- skip: {skip} -->")[0])) is named


def marked_lines(document: Path) -> list[tuple[str, str]]:
    """``(statement, function)`` for each line of a python block that ends in ``# <function of layers.py>``."""
    functions = {node.name for node in ast.parse(LAYERS.read_text()).body if isinstance(node, ast.FunctionDef)}
    marked = []
    for language, body in FENCE.findall(document.read_text(encoding="utf-8")):
        for line in body.splitlines() if language == "python" else []:
            code, _, comment = line.partition("  # ")
            if comment.strip() in functions:
                marked.append((code.strip(), comment.strip()))
    return marked


def test_lines_marked_with_a_function_are_that_functions_lines():
    marked = marked_lines(DERIVATION)
    assert len(marked) >= 21  # the forward: 7 lines, the staged backward: 13, the compact dx: 1
    wrong = [
        f"{code}  # {function}"
        for code, function in marked
        if function not in {enclosing_function(LAYERS, node.lineno) for node in statements_matching(LAYERS, code)}
    ]
    assert not wrong, "lines of the derivation that are not in numpyside/layers.py as marked:\n" + "\n".join(wrong)


def first_failure(path: Path) -> SybilFailure | None:
    """Run a Markdown file's examples in order, as pytest does; the first failure (None if none)."""
    sybil = doc_sybil()
    document = sybil.parse(path)
    for example in document.examples():
        try:
            example.evaluate()
        except SybilFailure as failure:
            return failure
    return None


def scratch_copy(tmp_path: Path, old: str, new: str) -> tuple[Path, int]:
    """The derivation with ``old`` (which must occur once) replaced; and the line of the change."""
    text = DERIVATION.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    (tmp_path / "docs").mkdir()
    copy = tmp_path / "docs" / DERIVATION.name
    copy.write_text(text.replace(old, new), encoding="utf-8")
    return copy, text[: text.index(old)].count("\n") + 1


def test_a_printed_number_changed_in_a_scratch_copy_fails(tmp_path):
    """The first output block of the derivation is the batch mean; one digit changed, that block fails
    (and nothing before it does)."""
    copy, line = scratch_copy(tmp_path, "mean\n[1.500000 1.500000 1.000000]", "mean\n[1.500000 1.500001 1.000000]")
    failure = first_failure(copy)
    assert failure is not None, "the changed number went unnoticed"
    assert failure.example.region.lexemes["arguments"] == OUTPUT_LANGUAGE
    assert failure.example.line == line - 1  # the fence of the output block holding the change
    assert "1.500001" in failure.result and "1.500000 1.500000 1.000000" in failure.result


def test_printed_output_that_the_page_does_not_show_fails(tmp_path):
    copy, _ = scratch_copy(tmp_path, "```output\nmean\n[1.500000 1.500000 1.000000]", "```text\nmean\n[1.5 1.5 1.0]")
    failure = first_failure(copy)
    assert failure is not None and "printed output that the document does not show" in failure.result
