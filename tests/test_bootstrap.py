"""eejax.eval.bootstrap: the difference of two arms and its interval, against closed forms."""
import math

import numpy as np
import pytest

from eejax.eval import bootstrap


def test_paired_interval_matches_the_normal_interval_of_the_differences():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 4000)
    b = a - 0.1 + rng.normal(0.0, 0.3, 4000)      # strongly paired: the shared part cancels
    d = bootstrap.paired_bootstrap(a, b, resamples=4000, seed=1)
    half = 1.96 * np.std(a - b, ddof=1) / math.sqrt(a.size)
    assert d.diff == pytest.approx(np.mean(a - b))
    assert d.lo == pytest.approx(d.diff - half, abs=0.2 * half)
    assert d.hi == pytest.approx(d.diff + half, abs=0.2 * half)
    assert d.separated and d.reading("A", "B") == "A above B"
    # Unpaired, the shared variance is not removed: a much wider interval around the same difference.
    u = bootstrap.bootstrap_difference(a, b, resamples=2000, seed=1)
    assert u.diff == pytest.approx(d.diff) and (u.hi - u.lo) > 2 * (d.hi - d.lo)


def test_no_difference_inside_the_interval_and_determinism():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 300).astype(float)
    b = np.where(rng.random(300) < 0.05, 1 - a, a)   # a few flips both ways: tiny difference
    d1 = bootstrap.paired_bootstrap(a, b, seed=3)
    d2 = bootstrap.paired_bootstrap(a, b, seed=3)
    assert d1 == d2
    assert d1.lo <= d1.diff <= d1.hi
    if not d1.separated:
        assert d1.reading("A", "B") == "no difference at this scale"


def test_groups_resample_whole_groups_and_transform_applies_to_the_mean():
    rng = np.random.default_rng(2)
    # 20 windows x 50 tokens; all variation is between windows, so token-level resampling is over-confident.
    w = np.repeat(rng.normal(0, 1, 20), 50)
    a, b = 3.0 + w, 2.9 + w + np.repeat(rng.normal(0, 0.5, 20), 50)
    groups = np.repeat(np.arange(20), 50)
    by_group = bootstrap.paired_bootstrap(a, b, groups_N=groups, seed=0, resamples=2000)
    by_token = bootstrap.paired_bootstrap(a, b, seed=0, resamples=2000)
    assert by_group.n == 20 and by_token.n == 1000
    assert (by_group.hi - by_group.lo) > 3 * (by_token.hi - by_token.lo)
    ppl = bootstrap.paired_bootstrap(a, b, groups_N=groups, transform=np.exp, seed=0, resamples=2000)
    assert ppl.diff == pytest.approx(np.exp(a.mean()) - np.exp(b.mean()))


def test_proportions_and_histograms():
    d = bootstrap.proportion_difference(0.9587, 0.9502, 10_000)
    se = math.sqrt(0.9587 * 0.0413 / 1e4 + 0.9502 * 0.0498 / 1e4)
    assert d.diff == pytest.approx(0.0085) and d.hi - d.diff == pytest.approx(1.959964 * se, rel=1e-5)
    x = bootstrap.expand_histogram([2, 0, 1], [0.05, 0.15, 0.25])
    np.testing.assert_allclose(x, [0.05, 0.05, 0.25])
    assert "[" in d.text(".4f")


@pytest.mark.parametrize("call, word", [
    (lambda: bootstrap.paired_bootstrap([1.0, 2.0], [1.0]), "same examples"),
    (lambda: bootstrap.paired_bootstrap([1.0, np.nan], [1.0, 2.0]), "non-finite"),
    (lambda: bootstrap.paired_bootstrap([1.0], [2.0], level=1.5), "level"),
    (lambda: bootstrap.paired_bootstrap([1.0], [2.0], resamples=10), "resamples"),
    (lambda: bootstrap.paired_bootstrap([1.0, 2.0], [2.0, 1.0], groups_N=[0]), "groups_N"),
    (lambda: bootstrap.proportion_difference(1.2, 0.5, 10), "p_a"),
    (lambda: bootstrap.expand_histogram([1, -1], [0.1, 0.2]), "counts_K"),
])
def test_bad_input_names_the_argument(call, word):
    with pytest.raises(ValueError, match=word):
        call()
