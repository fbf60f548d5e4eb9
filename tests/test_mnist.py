"""Tests of compare.mnist: real data, the hand-written IDX parser, checksums, lookup order, download."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from compare import mnist
from compare.mnist import MnistError, download_mnist, find_mnist_dir, load_mnist, read_idx

REAL_DIR = Path(os.environ.get("MNIST_DIR") or mnist.VENDORED_DIR)
NAMES = [name for name, _ in mnist.FILES.values()]


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """Encode ``arr`` as IDX independently of the module under test."""
    big = arr.astype(arr.dtype.newbyteorder(">"))
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + big.tobytes()


def write(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw, compresslevel=1) if path.suffix == ".gz" else raw)
    return path


def named(path: Path) -> str:
    return re.escape(str(path))


@pytest.fixture(scope="module")
def real():
    return load_mnist(REAL_DIR, return_source=True)


@pytest.fixture
def fake_files(tmp_path, monkeypatch):
    """Four tiny valid IDX files under the real names; FILES patched to their hashes."""
    src = tmp_path / "fake_src"
    src.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "train_labels": np.array([1, 2, 3], np.uint8),
        "test_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "test_labels": np.array([4, 5], np.uint8),
    }
    files = {}
    for key, (name, _) in mnist.FILES.items():
        raw = idx_bytes(arrays[key])
        write(src / name, raw)
        files[key] = (name, hashlib.sha256(raw).hexdigest())
    monkeypatch.setattr(mnist, "FILES", files)
    return src


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No MNIST_DIR, vendored copy hidden, user cache in tmp_path; returns the cache dir."""
    monkeypatch.delenv("MNIST_DIR", raising=False)
    empty = tmp_path / "no_vendored"
    empty.mkdir()
    monkeypatch.setattr(mnist, "VENDORED_DIR", empty)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "vmap-batchnorm" / "mnist"


# ---------------------------------------------------------------- real data


def test_real_mnist_shapes_dtypes_ranges(real):
    xtr, ytr, xte, yte, source = real
    assert xtr.shape == (60000, 784) and xtr.dtype == np.float32
    assert ytr.shape == (60000,) and ytr.dtype == np.int32
    assert xte.shape == (10000, 784) and xte.dtype == np.float32
    assert yte.shape == (10000,) and yte.dtype == np.int32
    for x in (xtr, xte):
        assert x.min() == 0.0 and x.max() == 1.0
        np.testing.assert_array_equal(x * 255, np.round(x * 255))  # exactly pixel / 255
    for y in (ytr, yte):
        assert set(np.unique(y)) == set(range(10))
    assert ytr[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert yte[:5].tolist() == [7, 2, 1, 0, 4]
    assert source == f"argument at {REAL_DIR.resolve()}"


def test_real_arrays_are_cached_and_read_only(real):
    again = load_mnist(REAL_DIR)
    assert len(again) == 4
    assert all(a is b for a, b in zip(again, real[:4]))
    for arr in again:
        assert not arr.flags.writeable
    with pytest.raises(ValueError):
        again[0][0, 0] = 0.5


# ---------------------------------------------------------------- IDX parser


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    "code,dtype,shape",
    [
        (0x08, np.uint8, (4, 3, 2)),
        (0x09, np.int8, (5,)),
        (0x0B, np.int16, (2, 3)),
        (0x0C, np.int32, (3, 1, 2, 2)),
        (0x0D, np.float32, (7,)),
        (0x0E, np.float64, (2, 2)),
    ],
)
def test_read_idx_round_trip(tmp_path, suffix, code, dtype, shape):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    rng = np.random.default_rng(1)
    arr = (rng.integers(info.min, info.max, shape, endpoint=True) if info else rng.normal(size=shape)).astype(dtype)
    raw = idx_bytes(arr, code)
    path = write(tmp_path / f"x.idx{suffix}", raw)
    got = read_idx(path, hashlib.sha256(raw).hexdigest())
    assert got.shape == shape and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize(
    "raw,problem",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "bad IDX magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "unknown IDX dtype code 0x07"),
        (b"\x00\x00\x08\x00", "number of dimensions 0"),
        (b"\x00\x00\x08\x09" + b"\x00\x00\x00\x01" * 9 + b"\x07", "number of dimensions 9"),
        (b"\x00\x00", "too short for an IDX header"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
    ],
)
def test_read_idx_bad_header(tmp_path, raw, problem):
    path = write(tmp_path / "bad-header.gz", raw)
    with pytest.raises(MnistError, match=named(path) + ".*" + re.escape(problem)):
        read_idx(path)


def test_read_idx_truncated_data(tmp_path):
    raw = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))[:-2]
    path = write(tmp_path / "short.gz", raw)
    with pytest.raises(MnistError, match=named(path) + r": truncated data: .*\(3, 4\).*12 data bytes.* holds 10"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    raw = idx_bytes(np.arange(6, dtype=np.int16), 0x0B) + b"\x00"
    path = write(tmp_path / "long", raw)
    with pytest.raises(MnistError, match=named(path) + r": trailing bytes .*12 data bytes.* holds 13"):
        read_idx(path)


@pytest.mark.parametrize("damage", ["cut", "flip", "not_gzip"])
def test_read_idx_corrupt_gzip(tmp_path, damage):
    packed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    if damage == "cut":
        packed = packed[: len(packed) // 2]
    elif damage == "flip":
        packed = packed[:-8] + bytes(b ^ 0xFF for b in packed[-8:-4]) + packed[-4:]  # corrupt the CRC
    else:
        packed = b"this is not gzip at all"
    path = tmp_path / "broken.gz"
    path.write_bytes(packed)
    with pytest.raises(MnistError, match=named(path) + ": corrupt or truncated gzip"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(MnistError, match=named(tmp_path / "nope.gz") + ": file not found"):
        read_idx(tmp_path / "nope.gz")


def test_read_idx_checksum_mismatch(tmp_path):
    raw = idx_bytes(np.zeros(4, np.uint8))
    path = write(tmp_path / "x.gz", raw)
    wrong = "0" * 64
    pattern = named(path) + f".*SHA-256 checksum.*expected {wrong}, got {hashlib.sha256(raw).hexdigest()}"
    with pytest.raises(MnistError, match=pattern):
        read_idx(path, wrong)


def test_load_mnist_rejects_swapped_file(tmp_path):
    for name in NAMES:
        (tmp_path / name).symlink_to(REAL_DIR.resolve() / name)
    bad = tmp_path / mnist.FILES["train_labels"][0]
    bad.unlink()
    write(bad, idx_bytes(np.zeros(60000, np.uint8)))  # valid IDX, right shape, wrong content
    with pytest.raises(MnistError, match=named(bad) + ".*checksum.*expected " + mnist.FILES["train_labels"][1]):
        load_mnist(tmp_path)


def test_load_mnist_checks_shapes_and_labels(tmp_path, fake_files, monkeypatch):
    # fake_files holds 3 train images where 60000 are required
    img = fake_files / mnist.FILES["train_images"][0]
    with pytest.raises(MnistError, match=named(img) + r".*shape \(60000, 28, 28\), got \(3, 28, 28\)"):
        load_mnist(fake_files)
    # right sizes, but a label of 10
    good = tmp_path / "sizes_ok"
    good.mkdir()
    arrays = {
        "train_images": np.zeros((60000, 28, 28), np.uint8),
        "train_labels": np.full(60000, 10, np.uint8),
        "test_images": np.zeros((10000, 28, 28), np.uint8),
        "test_labels": np.zeros(10000, np.uint8),
    }
    files = {}
    for key, (name, _) in mnist.FILES.items():
        raw = idx_bytes(arrays[key])
        write(good / name, raw)
        files[key] = (name, hashlib.sha256(raw).hexdigest())
    monkeypatch.setattr(mnist, "FILES", files)
    with pytest.raises(MnistError, match=named(good / files["train_labels"][0]) + r": labels outside 0\.\.9"):
        load_mnist(good)


# ---------------------------------------------------------------- lookup order


def dummy_dir(path: Path, names=NAMES) -> Path:
    path.mkdir(parents=True)
    for name in names:
        (path / name).write_bytes(b"")
    return path


def test_lookup_order(tmp_path, monkeypatch):
    arg, env, cache = dummy_dir(tmp_path / "arg"), dummy_dir(tmp_path / "env"), tmp_path / "xdg"
    dummy_dir(cache / "vmap-batchnorm" / "mnist")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("MNIST_DIR", str(env))
    assert find_mnist_dir(arg) == (arg, "argument")
    assert find_mnist_dir(str(arg)) == (arg, "argument")
    assert find_mnist_dir() == (env, "MNIST_DIR")
    monkeypatch.delenv("MNIST_DIR")
    assert find_mnist_dir() == (mnist.VENDORED_DIR, "vendored copy")
    monkeypatch.setattr(mnist, "VENDORED_DIR", tmp_path / "hidden")
    assert find_mnist_dir() == (cache / "vmap-batchnorm" / "mnist", "user cache")


def test_missing_explicit_dir_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    gone = tmp_path / "does-not-exist"
    with pytest.raises(MnistError, match=named(gone) + r" \(from the data_dir argument\) does not exist"):
        find_mnist_dir(gone)
    partial = dummy_dir(tmp_path / "partial", NAMES[:3])
    with pytest.raises(MnistError, match=named(partial) + f".* lacks {re.escape(NAMES[3])};"):
        load_mnist(partial)


def test_bad_mnist_dir_env_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(tmp_path))
    with pytest.raises(MnistError, match=named(tmp_path) + r" \(from the environment variable MNIST_DIR\) lacks"):
        find_mnist_dir()  # no fall-through to the vendored copy


# ---------------------------------------------------------------- download


def test_download_real_files_via_file_url(isolated, monkeypatch):
    monkeypatch.setattr(mnist, "MIRRORS", ("file:///definitely/not/here/", REAL_DIR.resolve().as_uri() + "/"))
    assert find_mnist_dir() == (isolated, "downloaded")
    assert sorted(p.name for p in isolated.iterdir()) == sorted(NAMES)  # no .part leftovers
    for name in NAMES:
        assert (isolated / name).read_bytes() == (REAL_DIR / name).read_bytes()
    assert find_mnist_dir() == (isolated, "user cache")


def test_download_rejects_bad_checksum_and_tries_next_mirror(tmp_path, fake_files):
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in NAMES:
        write(evil / name, idx_bytes(np.array([9], np.uint8)))
    dest = tmp_path / "dest"
    with pytest.raises(MnistError, match=r"(?s)could not download .*evil/train-images-idx3-ubyte\.gz.*checksum"):
        download_mnist(dest, mirrors=[evil.as_uri()])
    assert list(dest.iterdir()) == []
    urls = []

    def fetch(url, dest_path):
        urls.append(url)
        mnist._fetch(url, dest_path)

    assert download_mnist(dest, mirrors=[evil.as_uri(), fake_files.as_uri()], fetch=fetch) == dest
    assert len(urls) == 8 and urls[0].startswith(evil.as_uri()) and urls[1].startswith(fake_files.as_uri())
    for name in NAMES:
        assert (dest / name).read_bytes() == (fake_files / name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(NAMES)


def test_offline_failure_message(isolated, monkeypatch):
    def no_network(url, dest, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(mnist, "_fetch", no_network)
    with pytest.raises(MnistError) as info:
        load_mnist()
    msg = str(info.value)
    assert "MNIST not found and the download failed" in msg
    assert f"vendored copy: {mnist.VENDORED_DIR}" in msg
    assert f"user cache: {isolated}" in msg
    assert mnist.MIRRORS[0] + NAMES[0] in msg and mnist.MIRRORS[1] + NAMES[0] in msg
    assert "Temporary failure in name resolution" in msg
    assert "MNIST_DIR" in msg and "data_dir" in msg
    assert not [p for p in isolated.iterdir() if p.suffix == ".part"]


def test_unreachable_mirror_message(isolated, monkeypatch):
    monkeypatch.setattr(mnist, "MIRRORS", ("file:///no/such/mirror/",))
    with pytest.raises(
        MnistError, match=r"(?s)download failed.*file:///no/such/mirror/train-images.*Fix: set MNIST_DIR"
    ):
        find_mnist_dir()
