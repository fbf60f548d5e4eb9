"""MNIST from the four original IDX files, checked against SHA-256 and parsed by hand.

IDX format (big-endian throughout): two zero bytes, one dtype code byte (0x08 uint8, 0x09 int8,
0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), one byte holding the number of dimensions,
then one uint32 size per dimension, then exactly prod(sizes) items in C order. The MNIST files
are gzip-compressed; the SHA-256 figures in :data:`FILES` are those of the *decompressed* bytes.

Where the files are looked for, first match wins (see :func:`find_mnist_dir`):

1. the ``data_dir`` argument -- if given, it must hold all four files, else :class:`MnistError`;
2. the environment variable ``MNIST_DIR`` -- same rule, no silent fall-through;
3. the copy vendored in the repository, ``<repo>/data/mnist`` (:data:`VENDORED_DIR`);
4. the user cache, ``$XDG_CACHE_HOME/vmap-batchnorm/mnist`` (default ``~/.cache/...``);
5. a download from :data:`MIRRORS` into that cache (checked, written to a temp file, renamed).

Decoded arrays are cached in memory per directory and returned **read-only** (``.copy()`` to modify).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from rich.progress import DownloadColumn, Progress, TextColumn, TransferSpeedColumn

__all__ = ["FILES", "MIRRORS", "MnistError", "download_mnist", "find_mnist_dir", "load_mnist", "read_idx"]


class MnistError(RuntimeError):
    """MNIST could not be found, downloaded, decoded or verified; the message says which and why."""


# key -> (file name, SHA-256 of the decompressed bytes)
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
VENDORED_DIR = Path(__file__).resolve().parents[1] / "data" / "mnist"
DOWNLOAD_TIMEOUT = 15.0  # seconds, per socket operation

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path, gz: bool | None = None) -> bytes:
    """Raw contents of ``path``, gunzipped if ``gz`` (default: if its name ends in ``.gz``)."""
    try:
        if path.suffix == ".gz" if gz is None else gz:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise MnistError(f"{path}: file not found") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise MnistError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    except OSError as exc:
        raise MnistError(f"{path}: cannot read file ({exc})") from exc


def _check_sha256(where, raw: bytes, expected: str) -> None:
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected.lower():
        raise MnistError(
            f"{where}: SHA-256 checksum mismatch of the decompressed data: expected {expected}, got {actual}"
        )


def read_idx(path, expected_sha256: str | None = None) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into a native-endian array of the stored shape.

    If ``expected_sha256`` is given, the decompressed bytes must hash to it. Any problem -- bad
    magic, unknown dtype code, odd number of dimensions, too few or too many data bytes, corrupt
    gzip, checksum mismatch -- raises :class:`MnistError` naming ``path``.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if expected_sha256 is not None:
        _check_sha256(path, raw, expected_sha256)
    if len(raw) < 4:
        raise MnistError(f"{path}: too short for an IDX header ({len(raw)} bytes, need at least 4)")
    zero0, zero1, code, ndim = struct.unpack_from(">BBBB", raw, 0)
    if zero0 != 0 or zero1 != 0:
        raise MnistError(f"{path}: bad IDX magic: first two bytes are {raw[:2].hex()}, expected 0000")
    if code not in _IDX_DTYPES:
        raise MnistError(
            f"{path}: unknown IDX dtype code 0x{code:02X} (known: " + ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES) + ")"
        )
    if not 1 <= ndim <= 4:
        raise MnistError(f"{path}: unsupported IDX number of dimensions {ndim} (expected 1..4)")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise MnistError(f"{path}: truncated IDX header: {len(raw)} bytes, header needs {header_len}")
    dims = struct.unpack_from(f">{ndim}I", raw, 4)
    dtype = np.dtype(_IDX_DTYPES[code])
    expected_bytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual_bytes = len(raw) - header_len
    if actual_bytes != expected_bytes:
        problem = "truncated data" if actual_bytes < expected_bytes else "trailing bytes after data"
        raise MnistError(
            f"{path}: {problem}: header says shape {dims} of {dtype.name}, i.e. "
            f"{expected_bytes} data bytes, but the file holds {actual_bytes}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vmap-batchnorm/mnist``, or ``~/.cache/vmap-batchnorm/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vmap-batchnorm" / "mnist"


def _missing(directory: Path) -> list[str]:
    return [name for name, _ in FILES.values() if not (directory / name).is_file()]


def _fetch(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT) -> None:
    """Download ``url`` to ``dest`` with a progress bar (replace this to test without network)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with Progress(
            TextColumn(dest.name.split(".")[0]), DownloadColumn(), TransferSpeedColumn(), transient=True
        ) as bar:
            task = bar.add_task("download", total=total)
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                bar.advance(task, len(chunk))


def download_mnist(dest_dir, mirrors=None, fetch=None) -> Path:
    """Fetch the missing files into ``dest_dir``, trying each mirror in turn; verify each SHA-256.

    A file only appears under its final name once complete and verified (temp file, then rename).
    Raises :class:`MnistError` listing every failed attempt if some file could not be obtained.
    """
    dest_dir = Path(dest_dir)
    mirrors = MIRRORS if mirrors is None else mirrors
    fetch = _fetch if fetch is None else fetch
    failures = []
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name, sha in FILES.values():
        target = dest_dir / name
        if target.is_file():
            continue
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=name + ".", suffix=".part")
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                fetch(url, tmp)
                _check_sha256(url, _read_bytes(tmp, gz=name.endswith(".gz")), sha)
                os.replace(tmp, target)
                break
            except Exception as exc:  # any failure: remember it and try the next mirror
                failures.append(str(exc) if isinstance(exc, MnistError) else f"{url}: {type(exc).__name__}: {exc}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise MnistError(f"could not download {name} into {dest_dir}:\n  " + "\n  ".join(failures))
    return dest_dir


def find_mnist_dir(data_dir=None) -> tuple[Path, str]:
    """Directory holding the four files and a label for where it came from (see module docstring).

    Labels: ``"argument"``, ``"MNIST_DIR"``, ``"vendored copy"``, ``"user cache"``, ``"downloaded"``.
    Only the presence of the files is checked here; contents are verified when loading.
    """
    explicit = [("argument", data_dir), ("MNIST_DIR", os.environ.get("MNIST_DIR") or None)]
    for label, value in explicit:
        if value is None:
            continue
        directory = Path(value).expanduser()
        missing = _missing(directory)
        if missing:
            what = "data_dir argument" if label == "argument" else "environment variable MNIST_DIR"
            state = "does not exist" if not directory.is_dir() else "lacks " + ", ".join(missing)
            raise MnistError(
                f"MNIST directory {directory} (from the {what}) {state}; "
                f"it must contain: {', '.join(n for n, _ in FILES.values())}"
            )
        return directory, label
    searched = []
    for label, directory in (("vendored copy", Path(VENDORED_DIR)), ("user cache", user_cache_dir())):
        missing = _missing(directory)
        if not missing:
            return directory, label
        searched.append(f"  - {label}: {directory} (missing: {', '.join(missing)})")
    cache = user_cache_dir()
    try:
        return download_mnist(cache), "downloaded"
    except (MnistError, OSError) as exc:
        raise MnistError(
            "MNIST not found and the download failed.\n"
            "No complete copy in (MNIST_DIR is not set, no data_dir given):\n"
            + "\n".join(searched)
            + f"\nDownload into {cache} failed: {exc}\n"
            "Fix: set MNIST_DIR=/dir/with/the/four/files or call load_mnist(data_dir=...)."
        ) from exc


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


@functools.lru_cache(maxsize=4)
def _load_dir(directory: Path):
    out = {key: read_idx(directory / name, sha) for key, (name, sha) in FILES.items()}
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        img_file, lab_file = directory / FILES[f"{split}_images"][0], directory / FILES[f"{split}_labels"][0]
        if images.shape != (n, 28, 28):
            raise MnistError(f"{img_file}: expected images of shape {(n, 28, 28)}, got {images.shape}")
        if labels.shape != (n,):
            raise MnistError(f"{lab_file}: expected labels of shape {(n,)}, got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise MnistError(f"{lab_file}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
        # float32 throughout: the same bits as through float64 for all 256 pixel values, and faster
        out[f"{split}_images"] = _read_only(np.divide(images.reshape(n, 784), np.float32(255), dtype=np.float32))
        out[f"{split}_labels"] = _read_only(labels.astype(np.int32))
    return out["train_images"], out["train_labels"], out["test_images"], out["test_labels"]


def load_mnist(data_dir=None, *, return_source: bool = False):
    """``(train_images, train_labels, test_images, test_labels)``, plus a source string if asked.

    Images are float32 of shape (N, 784) scaled to [0, 1]; labels int32 of shape (N,); N is 60000
    for train and 10000 for test. The arrays are read-only (shared with the in-memory cache).
    With ``return_source=True`` a fifth element says which copy was used, e.g.
    ``"vendored copy at /repo/data/mnist"``.
    """
    directory, label = find_mnist_dir(data_dir)
    resolved = directory.resolve()
    arrays = _load_dir(resolved)
    return (*arrays, f"{label} at {resolved}") if return_source else arrays
