"""``python -m compare.variance``: two-pass against one-pass batch variance (:mod:`compare.studies.variance`)."""

from compare.studies.variance import main

if __name__ == "__main__":
    raise SystemExit(main())
