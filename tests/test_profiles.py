"""The digits evidence's data: the validation split, imbalance profiles and class orders, the shifted test
set, and the metrics that say where synthetic data went (worst class, the weakest third on validation).
Properties first, over random profiles and per-class counts."""

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import tasks


@pytest.fixture(scope="module")
def pool():
    (x, y), (x_test, y_test) = tasks.digits_split()
    return x, y, x_test, y_test


def test_validation_is_balanced_and_disjoint_from_training_and_test(pool):
    x, y, x_test, _ = pool
    rest, val = tasks.validation_split(y, tasks.DIGITS_VAL_PER_CLASS)
    assert np.bincount(y[val].numpy(), minlength=10).tolist() == [tasks.DIGITS_VAL_PER_CLASS] * 10
    assert set(rest.tolist()).isdisjoint(val.tolist()) and len(rest) + len(val) == len(y)
    task = tasks.digits_task()
    val_images = {im.numpy().tobytes() for im in task.val.images}
    assert not val_images & {im.numpy().tobytes() for im in task.train.images}   # never trained on
    train_rows = {row.numpy().tobytes() for row in x[rest]}
    assert {im.numpy().tobytes() for im in task.train.images} <= train_rows
    assert len(task.test.labels) == len(x_test)                                      # the fixed test split


@given(ratio=st.floats(1, 200), seed=st.integers(0, 10_000))
def test_a_profile_keeps_the_exponential_counts_in_its_class_order(pool, ratio, seed):
    _, y, _, _ = pool
    order = tasks.class_order(str(seed), 10)
    counts = np.bincount(y[tasks.long_tailed(y, ratio, order)].numpy(), minlength=10)
    n_max = int(torch.bincount(y).min())
    assert [counts[c] for c in order] == [round(n_max * ratio ** (-i / 9)) for i in range(10)]
    assert all(counts[a] >= counts[b] for a, b in zip(order, order[1:]))


def test_class_order_takes_a_seed_or_a_permutation():
    assert tasks.class_order(None, 10) == list(range(10))
    drawn = tasks.class_order("1", 10)
    assert sorted(drawn) == list(range(10)) and drawn == tasks.class_order("1", 10) != tasks.class_order("2", 10)
    assert tasks.class_order("9,8,7,6,5,4,3,2,1,0", 10) == list(range(9, -1, -1))
    for bad in ("1,2,3", "0,0,1,2,3,4,5,6,7,8", "x", "-1"):
        with pytest.raises(ValueError, match="a permutation of 0..9"):
            tasks.class_order(bad, 10)


def test_shifted_test_set_is_deterministic_in_range_and_shifted(pool):
    _, _, x_test, _ = pool
    shifted = tasks.shifted_digits(x_test)
    assert shifted.shape == x_test.shape and torch.equal(shifted, tasks.shifted_digits(x_test))
    assert shifted.min() >= 0 and shifted.max() <= 1
    moved = (shifted - x_test).abs().flatten(1).amax(1)
    assert (moved > 0.1).all()                      # every image is changed, by a rotation of at least 10 degrees
    assert not torch.equal(shifted, tasks.shifted_digits(x_test, seed=1))


def test_judge_is_deterministic_and_recognises_the_shifted_set_worse(pool):
    task = tasks.digits_task()
    judge = tasks.digits_judge()
    clean, shifted = (tasks.evaluate(judge, d, 10, torch.device("cpu")) for d in (task.test, task.evals["shifted"]))
    clean_acc, shifted_acc = (c.sum() / n.sum() for c, n in (clean, shifted))
    assert clean_acc > 0.9 and shifted_acc < clean_acc - 0.1
    assert judge is tasks.digits_judge()            # trained once per process


@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_weakest_third_holds_the_lowest_accuracies(per_class):
    hard = tasks.weakest_classes(per_class)
    assert len(hard) == max(1, round(len(per_class) / 3)) and hard == sorted(hard)
    others = [a for c, a in enumerate(per_class) if c not in hard]
    assert not others or max(per_class[c] for c in hard) <= min(others)


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=2, max_size=12))
def test_worst_class_is_the_minimum_over_classes_with_images(pairs):
    count = np.array([n for _, n in pairs])
    correct = np.array([min(c, n) for c, n in pairs])
    if count.sum() == 0:
        return
    worst = tasks.split_accuracy(correct, count, {})["worst_acc"]
    assert worst == min(c / n for c, n in zip(correct, count) if n > 0)
    assert worst <= correct.sum() / count.sum()
