"""Building a shipped C source once per machine, and falling back when that cannot be done."""

from __future__ import annotations

import shutil
import warnings

import pytest

from training.networks.blocks import native_build
from training.networks.blocks.native_build import forget_builds, load_library

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty build cache, and what load_library remembers forgotten before and after."""
    monkeypatch.setenv("NAPARI_DMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native_build.DISABLE_VARIABLE, raising=False)
    forget_builds()
    yield tmp_path / "cache" / "native"
    forget_builds()


def _source(tmp_path, body="int answer(void) { return 42; }"):
    path = tmp_path / "answer.c"
    path.write_text(body + "\n")
    return path


@needs_compiler
def test_builds_once_into_the_cache_and_reuses_it(cache, tmp_path):
    source = _source(tmp_path)
    lib = load_library(source)
    assert lib is not None and lib.answer() == 42
    built = sorted(cache.iterdir())
    assert len(built) == 1 and built[0].name.startswith("answer-")  # no temporary left
    stamp = built[0].stat().st_mtime_ns
    load_library.cache_clear()  # a new process: loads the built file, no new build
    assert load_library(source).answer() == 42
    assert sorted(cache.iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    load_library.cache_clear()
    source.write_text("int answer(void) { return 43; }\n")  # a changed source builds anew
    assert load_library(source).answer() == 43
    assert len(list(cache.iterdir())) == 2


def test_no_compiler_warns_once_and_returns_none(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.warns(RuntimeWarning, match="no C compiler 'no-such-compiler-here'.*"
                                            "pure-torch path"):
        assert load_library(_source(tmp_path)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_library(_source(tmp_path)) is None  # remembered: no second warning


def test_no_compiler_is_said_once_for_all_kernels(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.warns(RuntimeWarning, match="native kernels"):
        assert load_library(_source(tmp_path)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_library(_source(other)) is None  # a second kernel: no second warning


@needs_compiler
def test_a_changed_header_beside_the_source_builds_anew(cache, tmp_path):
    (tmp_path / "value.h").write_text("#define VALUE 7\n")
    source = _source(tmp_path, '#include "value.h"\nint answer(void) { return VALUE; }')
    assert load_library(source).answer() == 7
    load_library.cache_clear()
    (tmp_path / "value.h").write_text("#define VALUE 8\n")
    assert load_library(source).answer() == 8


@needs_compiler
def test_a_source_that_does_not_build_warns_with_the_compiler_message(cache, tmp_path):
    with pytest.warns(RuntimeWarning, match="exited with.*error"):
        assert load_library(_source(tmp_path, "int answer(void) { return }")) is None
    assert not cache.exists() or not any(cache.iterdir())  # the temporary file is gone


def test_disabled_by_environment_without_a_warning(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(native_build.DISABLE_VARIABLE, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_library(_source(tmp_path)) is None
    assert not cache.exists()


@needs_compiler
def test_unwritable_cache_builds_in_the_temporary_folder(cache, tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("NAPARI_DMOE_CACHE", str(blocked))  # cache_dir() cannot be made
    monkeypatch.setattr(native_build.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lib = load_library(_source(tmp_path))
    assert lib is not None and lib.answer() == 42
