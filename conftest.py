"""pytest collects the documentation too: the Python blocks of ``docs/*.md`` and ``README.md`` run as
tests, and the output they print is checked (``tests/doc_examples.py``; ``testpaths`` in
``pyproject.toml`` names the docs next to ``tests/``)."""

from tests.doc_examples import doc_sybil

pytest_collect_file = doc_sybil().pytest()
