"""``python -m compare.bench``: the bench (and, with ``--worker-threads``, one of its workers)."""

from compare.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
