import itertools

import pytest

from annotator.core.folds import disjoint_subsets, out_of_fold_voters


@pytest.mark.parametrize("n", [2, 3, 5])
def test_subsets_are_pairwise_disjoint_and_cover(n):
    items = [f"img{i}" for i in range(23)]
    subsets = disjoint_subsets(items, n, seed=3)
    assert len(subsets) == n
    for a, b in itertools.combinations(subsets, 2):
        assert not set(a) & set(b)
    assert sorted(itertools.chain(*subsets)) == sorted(items)
    assert max(map(len, subsets)) - min(map(len, subsets)) <= 1


def test_subsets_deterministic_per_seed():
    items = list(range(30))
    assert disjoint_subsets(items, 3, 1) == disjoint_subsets(items, 3, 1)
    assert disjoint_subsets(items, 3, 1) != disjoint_subsets(items, 3, 2)


def test_out_of_fold_voters_exclude_own_subset():
    subsets = disjoint_subsets(list(range(10)), 5, 0)
    for k, subset in enumerate(subsets):
        for item in subset:
            voters = out_of_fold_voters(item, subsets)
            assert k not in voters and len(voters) == 4


def test_bad_arguments():
    with pytest.raises(ValueError):
        disjoint_subsets([1, 2, 3], 1)
    with pytest.raises(ValueError):
        disjoint_subsets([1], 2)
    with pytest.raises(ValueError):
        disjoint_subsets([1, 1, 2], 2)
