"""An updated checkout never crashes on a stale numba cache (:mod:`numpyside.kernels.jit`).

The scenario of numba/numba#6018, as a source update makes it: a cached kernel was compiled for a
``NamedTuple`` that the update renames. numba's own cache index still names the old type, and
loading it raises ``AttributeError`` at the kernel's first call. Here a small package builds such
a cache in one process, is updated, and runs again in a fresh process: the stale index is really
there and really unloadable, yet the kernel recompiles and returns the right value.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = """\
from typing import NamedTuple


class {name}(NamedTuple):
    a: float
    b: float
"""
KERNEL = """\
from numpyside.kernels.jit import njit

from stalepkg.shapes import {name} as Shape


@njit()
def total(p):
    return p.a + p.b
"""


def write_version(package: Path, type_name: str) -> None:
    (package / "shapes.py").write_text(SHAPES.format(name=type_name))
    (package / "kernel.py").write_text(KERNEL.format(name=type_name))  # `total` stays on the same line


def run(code: str, root: Path, cache_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    env.pop("NUMBA_CACHE_DIR", None)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


def indexes(package: Path) -> list[Path]:
    return sorted((package / "__pycache__").rglob("*.nbi"))


def test_a_renamed_type_in_the_cache_recompiles_instead_of_crashing(tmp_path):
    package = tmp_path / "stalepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    call = "from stalepkg.kernel import total, Shape; print(total(Shape(1.0, 2.0)))"

    write_version(package, "Pair")
    first = run(call, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "3.0"
    (stale_index,) = indexes(package)

    write_version(package, "Couple")  # the update: the type the cache names is gone
    load_index = f"""
        import pickle
        with open({str(stale_index)!r}, "rb") as f:
            pickle.load(f)
            pickle.loads(f.read())
    """
    stale = run(load_index, tmp_path)
    assert stale.returncode != 0 and "Pair" in stale.stderr, "the first run did not leave a stale index"

    second = run(call, tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "3.0"
    (fresh_index,) = indexes(package)  # the stale directory was removed, the new one holds the kernel
    assert fresh_index.parent.parent != stale_index.parent.parent
    assert not stale_index.exists()


def test_the_cache_is_keyed_by_the_folder_sources(tmp_path):
    from numpyside.kernels import jit

    (tmp_path / "a.py").write_text("x = 1\n")
    key = jit.source_key(tmp_path)
    assert jit.source_key(tmp_path) == key
    (tmp_path / "b.py").write_text("")
    assert jit.source_key(tmp_path) != key
    (tmp_path / "b.py").unlink()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert jit.source_key(tmp_path) != key


def test_numba_cache_dir_is_respected_and_an_unusable_one_means_no_cache(tmp_path):
    package = tmp_path / "stalepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_version(package, "Pair")
    call = "from stalepkg.kernel import total, Shape; print(total(Shape(1.0, 2.0)))"

    cache = tmp_path / "cache"
    result = run(call, tmp_path, cache_dir=cache)
    assert result.returncode == 0 and result.stdout.strip() == "3.0", result.stderr
    assert indexes(package) == [] and len(list((cache / "vmap-batchnorm").rglob("*.nbi"))) == 1

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    result = run(call, tmp_path, cache_dir=not_a_folder)
    assert result.returncode == 0 and result.stdout.strip() == "3.0", result.stderr
    assert indexes(package) == []
