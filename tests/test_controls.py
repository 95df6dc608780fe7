"""fare_pipeline.controls: profile controls and masking sets, hand-worked."""

import numpy as np
import pytest
import torch

from fare_pipeline.controls import control_suite, flatten, inverted, mask_sets, power, random_profile, top_k

# rows = decoder layers 3, 5, 7 ; AALS selected 3 and 7
PHI = torch.tensor([[0.2, 1.0, 0.4, 0.0],
                    [9.0, 9.0, 9.0, 9.0],
                    [0.6, 0.1, 1.8, 0.3]], dtype=torch.float64)
LAYERS, SEL = [3, 5, 7], [3, 7]


def test_flatten_and_inverted_by_hand():
    f = flatten(PHI, LAYERS, SEL).numpy()
    np.testing.assert_allclose(f[[0, 2]], np.full((2, 4), 4.4 / 8))
    np.testing.assert_array_equal(f[1], PHI[1].numpy())  # unselected row untouched
    fl = flatten(PHI, LAYERS, SEL, scope="layer").numpy()
    np.testing.assert_allclose(fl[0], 0.4)
    np.testing.assert_allclose(fl[2], 0.7)
    inv = inverted(PHI, LAYERS, SEL).numpy()
    np.testing.assert_allclose(inv[0], [1.6, 0.8, 1.4, 1.8])
    np.testing.assert_allclose(inv[2], [1.2, 1.7, 0.0, 1.5])


def test_power_and_top_k_by_hand():
    np.testing.assert_allclose(power(PHI, 2.0, LAYERS, SEL).numpy()[2], [0.36, 0.01, 3.24, 0.09])
    t = top_k(PHI, 3, LAYERS, SEL).numpy()
    np.testing.assert_allclose(t[0], [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(t[2], [0.6, 0.0, 1.8, 0.0])
    assert np.count_nonzero(top_k(PHI, 100, LAYERS, SEL).numpy()[[0, 2]]) == 7  # 7 non-zero selected entries


def test_random_profile_permutes_within_layers_and_is_seeded():
    r = random_profile(PHI, 0, LAYERS, SEL).numpy()
    for row in (0, 2):
        assert sorted(r[row]) == sorted(PHI[row].tolist())
    np.testing.assert_array_equal(r, random_profile(PHI, 0, LAYERS, SEL).numpy())
    assert any(not np.array_equal(random_profile(PHI, s, LAYERS, SEL).numpy(), r) for s in (1, 2, 3))


def test_suite_is_table4():
    suite = control_suite(PHI, LAYERS, SEL)
    assert len(suite) == 17  # flatten, 5 random, inverted, 5 powers, 5 top-k
    assert [c.name for c in suite].count("random") == 5
    fsp = next(c for c in suite if c.name == "power" and c.params["alpha"] == 1.0)
    torch.testing.assert_close(fsp.phi, PHI)


def test_mask_sets_by_hand():
    s = mask_sets(PHI, LAYERS, SEL, n=2, random_draws=3, seed=1)
    assert s["top"] == [(3, 1), (7, 2)]
    assert s["bottom"] == [(3, 3), (7, 1)]
    assert len(s["random"]) == 3 and all(len(d) == 2 and all(layer in (3, 7) for layer, _ in d) for d in s["random"])
    with pytest.raises(ValueError, match="only 8 selected experts"):
        mask_sets(PHI, LAYERS, SEL, n=9)


def test_bad_input():
    with pytest.raises(ValueError, match="selected layer 4 is not a profile row; allowed: \\[3, 5, 7\\]"):
        flatten(PHI, LAYERS, [4])
    with pytest.raises(ValueError, match="alpha=0"):
        power(PHI, 0, LAYERS, SEL)
    with pytest.raises(ValueError, match="scope='model'"):
        inverted(PHI, LAYERS, SEL, scope="model")
