"""Shared setup: JAX's 64-bit mode (the float64 comparisons need it), and the real MNIST data set,
loaded once per test session."""

from __future__ import annotations

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="session")
def mnist():
    """``(train_x, train_y, test_x, test_y)`` from :func:`compare.mnist.load_mnist` (honours ``MNIST_DIR``)."""
    from compare.mnist import load_mnist

    return load_mnist()
