"""``python -m compare.per_example``: per-example gradients under batch norm (:mod:`compare.studies.per_example`)."""

from compare.studies.per_example import main

if __name__ == "__main__":
    raise SystemExit(main())
