from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from training.data import (
    Case,
    DataError,
    assign_splits,
    build_vocabulary,
    encode_attribute,
)


def _cases(n: int, *, split=None, groups: int | None = None) -> list[Case]:
    return [Case(id=f"c{i}", image=Path(f"c{i}.png"), label=None,
                 attributes={"race": "ABC"[i % 3] if i % 7 else ""}, split=split,
                 group_key=None if groups is None else f"g{i % groups}")
            for i in range(n)]


def test_assign_splits_fractions_seed_and_order():
    cases = _cases(100)
    out = assign_splits(cases, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert [c.id for c in out] == [c.id for c in cases]
    assert Counter(c.split for c in out) == {"train": 70, "val": 10, "test": 20}
    assert assign_splits(cases, 0.1, 0.2, seed=1) == out
    assert assign_splits(cases, 0.1, 0.2, seed=2) != out


def test_assign_splits_keeps_existing_and_groups():
    cases = _cases(40, groups=8)
    cases[0] = Case(id="fixed", image=Path("f.png"), label=None, split="test")
    out = assign_splits(cases, seed=0)
    assert out[0].split == "test"
    split_of_group: dict[str, set] = {}
    for case in out[1:]:
        split_of_group.setdefault(case.group_key, set()).add(case.split)
    assert all(len(s) == 1 for s in split_of_group.values())
    assert {c.split for c in out} == {"train", "val", "test"}


def test_assign_splits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        assign_splits(_cases(4), val_fraction=1.5)
    with pytest.raises(ValueError, match="must be < 1"):
        assign_splits(_cases(4), val_fraction=0.5, test_fraction=0.5)
    bad = [Case(id="x", image=Path("x.png"), label=None, split="dev")]
    with pytest.raises(DataError, match="case x: split 'dev'"):
        assign_splits(bad)


def test_vocabulary_uses_train_split_only_and_encodes_unknowns():
    cases = _cases(6, split="train") + [
        Case(id="t", image=Path("t.png"), label=None, attributes={"race": "Z"}, split="test")]
    vocab = build_vocabulary(cases, "race")
    assert vocab == ["A", "B", "C"]
    assert encode_attribute("B", vocab) == 1
    assert encode_attribute("", vocab) == -1
    assert encode_attribute("Z", vocab) == -1
    assert encode_attribute(None, vocab) == -1


def test_vocabulary_errors():
    with pytest.raises(DataError, match="no training cases"):
        build_vocabulary(_cases(3, split="test"), "race")
    with pytest.raises(DataError, match="'sex' does not exist; available: race"):
        build_vocabulary(_cases(3, split="train"), "sex")
    empty = [Case(id="a", image=Path("a.png"), label=None, attributes={"race": ""},
                  split="train")]
    with pytest.raises(DataError, match="empty for every training case"):
        build_vocabulary(empty, "race")
