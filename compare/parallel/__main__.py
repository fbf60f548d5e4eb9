"""``python -m compare.parallel``: data-parallel training, checked against one device and the NumPy side."""

from compare.parallel.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
