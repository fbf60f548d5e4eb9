"""``python -m compare.jaxpr``: where batch norm's coupling lives in JAX's gradient (:mod:`compare.studies.jaxpr`)."""

from compare.studies.jaxpr import main

if __name__ == "__main__":
    raise SystemExit(main())
