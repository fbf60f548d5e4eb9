"""numba's compiler for the NumPy side's kernels, with an on-disk cache that an updated checkout cannot break.

numba caches a compiled function in ``__pycache__`` next to its source, in an index that pickles the
argument types of every signature compiled so far. When one of those types (a ``NamedTuple`` of
:mod:`numpyside.kernels.fused`, say) is moved or renamed, unpickling the index fails before numba
gets to compare the source's stamp, and the kernel's first call raises instead of recompiling
(numba/numba#6018). So here each folder's kernels are cached in a directory named after a hash of
that folder's sources and of numba's version, ``__pycache__/numba-<key>``: a changed source means a
new, empty directory, and numba compiles afresh; the directories of earlier sources are removed
when a new one is made. If ``NUMBA_CACHE_DIR`` is set, the keyed directories go under
``$NUMBA_CACHE_DIR/vmap-batchnorm/<hash of the folder's path>`` instead; where no directory is
writable, nothing is cached (numba compiles in every process).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numba

PREFIX = "numba-"


def source_key(folder: Path) -> str:
    """A hash of the ``*.py`` files of ``folder`` (names and contents) and of numba's version."""
    digest = hashlib.sha256(numba.__version__.encode())
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError:
        return False
    return True


@functools.cache
def cache_dir(folder: Path) -> Path | None:
    """The cache directory of the kernels in ``folder`` (made, and the other keys' removed), or None."""
    if numba.config.CACHE_DIR:  # one folder per source folder: checkouts side by side keep their caches
        base = Path(numba.config.CACHE_DIR, "vmap-batchnorm", hashlib.sha256(str(folder).encode()).hexdigest()[:16])
    else:
        base = folder / "__pycache__"
    directory = base / f"{PREFIX}{source_key(folder)}"
    if directory.is_dir():
        return directory
    if not _writable(directory):
        return None
    for stale in base.glob(f"{PREFIX}*"):
        if stale != directory:
            shutil.rmtree(stale, ignore_errors=True)
    return directory


@contextlib.contextmanager
def _caching_into(directory: Path):
    """numba reads ``config.CACHE_DIR`` when a function is decorated with ``cache=True``; set it for that."""
    saved = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(directory)
    try:
        yield
    finally:
        numba.config.CACHE_DIR = saved


def _cached(decorator: Callable, function: Callable, **options):
    directory = cache_dir(Path(inspect.getfile(function)).resolve().parent)
    if directory is None:
        return decorator(**options)(function)
    with _caching_into(directory):
        return decorator(cache=True, **options)(function)


def njit(**options) -> Callable:
    """``numba.njit(**options)`` with the keyed cache: ``@njit(fastmath=False, ...)``."""
    return functools.partial(_cached, numba.njit, **options)


def cfunc(signature, **options) -> Callable:
    """``numba.cfunc(signature, **options)`` with the keyed cache."""
    return functools.partial(_cached, functools.partial(numba.cfunc, signature), **options)
