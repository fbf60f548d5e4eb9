"""The handwritten, batched NumPy/numba side: every forward has its backward right below it; no autodiff."""
