"""Mean-image subtraction, PCA lighting and the 10 test crops, against plain numpy."""

import numpy as np
import torch

from alexnetd.pipeline.transform import InputTransform, ten_crop_offsets

rng = np.random.default_rng(0)
MEAN = rng.uniform(0, 255, (256, 256, 3)).astype(np.float32)
# A real-looking colour covariance: eigen-decompose a random SPD matrix (0..255 scale).
_A = rng.normal(size=(3, 3))
EIGVALS, EIGVECS = np.linalg.eigh(_A @ _A.T * 3000.0)


def make():
    return InputTransform(MEAN, EIGVALS, EIGVECS)


def test_train_input_is_crop_minus_mean_crop_plus_lighting():
    n = 5
    images = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    crops = rng.integers(0, 33, (n, 2)).astype(np.int16)
    flips = np.array([0, 1, 0, 1, 1], np.uint8)
    alphas = rng.normal(0, 0.1, (n, 3)).astype(np.float32)
    got = make().train(torch.from_numpy(images), crops, flips, alphas).numpy()
    assert got.shape == (n, 3, 224, 224)
    for i in range(n):
        top, left = crops[i]
        mean_crop = MEAN[top:top + 224, left:left + 224]
        if flips[i]:
            mean_crop = mean_crop[:, ::-1]
        # §4.1: add [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T, eigenvalues of the [0,1]-scaled covariance.
        shift = 255.0 * sum(EIGVECS[:, k] * alphas[i, k] * EIGVALS[k] / 255.0 ** 2 for k in range(3))
        expected = images[i].astype(np.float64) - mean_crop + shift
        np.testing.assert_allclose(got[i].transpose(1, 2, 0), expected, rtol=1e-5, atol=1e-3)


def test_lighting_off_leaves_only_the_mean_subtraction():
    images = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    t = InputTransform(MEAN, EIGVALS, EIGVECS, lighting=False)
    got = t.train(torch.from_numpy(images), np.zeros((2, 2), np.int16), np.zeros(2, np.uint8),
                  np.ones((2, 3), np.float32)).numpy()
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1), images - MEAN[:224, :224], atol=1e-3)


def test_lighting_shift_is_a_few_grey_levels():
    shift = make().lighting_shift(torch.full((1, 3), 0.1)).numpy()
    assert 0 < np.abs(shift).max() < 30


def test_ten_crops_are_four_corners_and_centre_and_their_mirrors():
    offsets = ten_crop_offsets()
    assert offsets[:5] == [(0, 0, False), (0, 32, False), (32, 0, False), (32, 32, False), (16, 16, False)]
    assert offsets[5:] == [(t, l, True) for t, l, _ in offsets[:5]]
    images = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    got = make().eval(torch.from_numpy(images), crops=10).numpy()
    assert got.shape == (20, 3, 224, 224)
    for i in range(2):
        centred = images[i].astype(np.float64) - MEAN
        for v, (top, left, mirrored) in enumerate(offsets):
            expected = centred[top:top + 224, left:left + 224]
            if mirrored:
                expected = expected[:, ::-1]
            np.testing.assert_allclose(got[i * 10 + v].transpose(1, 2, 0), expected, atol=1e-3)


def test_centre_crop_is_the_middle_224():
    images = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    got = make().eval(torch.from_numpy(images), crops=1).numpy()
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1), (images - MEAN)[:, 16:240, 16:240], atol=1e-3)
