"""Shared pieces of both sides (layout, initialisation, MNIST) and the side-by-side comparison."""
