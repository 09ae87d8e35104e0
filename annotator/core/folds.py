"""Disjoint training subsets for the checker ensemble and out-of-fold voting (spec 003, claims 6-7).

The patent trains N checkers on N pairwise-disjoint subsets of the pre-checked images.
A checker that trained on an image remembers its label, so an image is only ever
judged by checkers whose subset does not contain it ("out-of-fold").
"""
from __future__ import annotations

import random
from typing import Hashable, Sequence, TypeVar

T = TypeVar("T", bound=Hashable)


def disjoint_subsets(items: Sequence[T], n: int, seed: int = 0) -> list[list[T]]:
    """Split ``items`` into ``n`` pairwise-disjoint subsets that together cover them.

    Sizes differ by at most one. Deterministic for a given seed. Raises ValueError when
    ``n < 2`` or when there are fewer items than subsets.
    """
    if n < 2:
        raise ValueError(f"the checker ensemble needs at least 2 subsets, got {n}")
    if len(set(items)) != len(items):
        raise ValueError("items must be unique")
    if len(items) < n:
        raise ValueError(f"cannot split {len(items)} images into {n} non-empty subsets")
    order = list(items)
    random.Random(seed).shuffle(order)
    return [order[k::n] for k in range(n)]


def out_of_fold_voters(item: T, subsets: Sequence[Sequence[T]]) -> list[int]:
    """Indices of the subsets (checkers) that did not train on ``item``."""
    return [k for k, subset in enumerate(subsets) if item not in subset]
