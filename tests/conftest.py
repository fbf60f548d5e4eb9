"""Shared fixtures: the real MNIST data set, loaded once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mnist():
    """``(train_x, train_y, test_x, test_y)`` from :func:`compare.mnist.load_mnist` (honours ``MNIST_DIR``)."""
    from compare.mnist import load_mnist

    return load_mnist()
