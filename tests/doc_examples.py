"""The documentation runs: how pytest collects the Python blocks of ``docs/*.md`` and ``README.md``
(through Sybil, https://sybil.readthedocs.io; the hook is in the repository's ``conftest.py``).

Conventions in the Markdown (``docs/batchnorm_backward.md`` says them for readers):

* a ```` ```python ```` block runs, in one namespace per document, top to bottom;
* an ```` ```output ```` block right after it holds what that block prints: the printed text must
  match it (doctest's comparison, ``...`` matches anything), and a block that prints without an
  ``output`` block after it fails, so no printed number goes unchecked; ```` ```python ```` blocks
  written as ``>>>`` sessions are checked as doctests;
* a block that only illustrates (a fragment with names from elsewhere) is preceded by
  ``<!-- skip: next "fragment: why it cannot run" -->`` and reported as skipped, with that reason;
* blocks that need an optional extra sit between ``<!-- skip: start if(condition, reason="why") -->``
  and ``<!-- skip: end -->`` (Sybil's conditional skip, evaluated when the page runs): skipped with
  that reason where the condition holds, run and checked like any other block where it does not;
* other fences (``bash``, ``text``) are shell commands and captured output of commands: not Python.

``tests/test_docs.py`` checks that nothing escapes this by accident (a ``py`` fence, a skip without
a reason) and that a changed number fails.
"""

from __future__ import annotations

import contextlib
import doctest
import io
from pathlib import Path

from sybil import Document, Example, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[1]
#: Which files are documentation that runs (relative to the repository root).
DOC_PATTERNS = ("docs/*.md", "README.md")
OUTPUT_LANGUAGE = "output"
#: doctest's comparison of printed text: ``...`` stands for anything, runs of blanks are one.
OUTPUT_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


class PrintedOutput:
    """Runs ``python`` blocks with their printing captured, and checks ``output`` blocks against it."""

    def __init__(self) -> None:
        self._python = PythonEvaluator()
        self._unchecked: dict[Document, tuple[int, str]] = {}  # document -> (line, text) printed, not yet shown

    def _unshown(self, document: Document) -> str | None:
        if document not in self._unchecked:
            return None
        line, text = self._unchecked.pop(document)
        return (
            f"the python block at line {line} printed output that the document does not show; put an "
            f"```{OUTPUT_LANGUAGE} block with it right after that block:\n{text}"
        )

    def run_python(self, example: Example) -> str | None:
        failure = self._unshown(example.document)
        if failure:
            return failure
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self._python(example)
        if printed.getvalue():
            self._unchecked[example.document] = (example.line, printed.getvalue())
        return None

    def check_output(self, example: Example) -> str | None:
        line, got = self._unchecked.pop(example.document, (None, ""))
        want = str(example.parsed)
        checker = doctest.OutputChecker()
        if checker.check_output(want, got, OUTPUT_FLAGS):
            return None
        source = f"the python block at line {line}" if line else "no python block (it printed nothing)"
        return (
            f"the {OUTPUT_LANGUAGE} block at line {example.line} is not what {source} printed:\n"
            + checker.output_difference(doctest.Example("", want), got, OUTPUT_FLAGS)
        )

    def teardown(self, namespace: dict) -> None:
        """After a document: output printed by its last block must have been shown."""
        for document in [d for d in self._unchecked if d.namespace is namespace]:
            raise AssertionError(self._unshown(document))


def doc_sybil() -> Sybil:
    """The Sybil that collects the runnable documentation (one per pytest session)."""
    printed = PrintedOutput()
    python_blocks = PythonCodeBlockParser(doctest_optionflags=OUTPUT_FLAGS)
    python_blocks.codeblock_parser = CodeBlockParser("python", printed.run_python)
    return Sybil(
        parsers=[python_blocks, CodeBlockParser(OUTPUT_LANGUAGE, printed.check_output), SkipParser()],
        patterns=list(DOC_PATTERNS),
        path=str(ROOT),
        teardown=printed.teardown,
        name="docs",
    )


def run_document(path: Path) -> None:
    """Run every example of one Markdown file in order, as pytest would (raises on the first failure)."""
    sybil = doc_sybil()
    document = sybil.parse(path)
    for example in document.examples():
        example.evaluate()
    if sybil.teardown:
        sybil.teardown(document.namespace)
