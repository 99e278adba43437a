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


def expected_train_input(image, top, left, flipped, alphas):
    """crop -> mirror -> mean -> lighting, in float64 numpy, for one whole 256x256 image."""
    patch = image[top:top + 224, left:left + 224].astype(np.float64)
    mean_crop = MEAN[top:top + 224, left:left + 224].astype(np.float64)
    if flipped:
        patch, mean_crop = patch[:, ::-1], mean_crop[:, ::-1]
    # §4.1: add [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T, eigenvalues of the [0,1]-scaled covariance.
    shift = 255.0 * sum(EIGVECS[:, k] * alphas[k] * EIGVALS[k] / 255.0 ** 2 for k in range(3))
    return patch - mean_crop + shift


def test_train_input_is_crop_mirror_minus_mean_plus_lighting():
    n = 6
    images = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    crops = np.array([[0, 0], [32, 32], [0, 32], [32, 0], [7, 19], [16, 16]], np.int16)
    flips = np.array([0, 1, 0, 1, 1, 0], np.uint8)
    alphas = rng.normal(0, 0.1, (n, 3)).astype(np.float32)
    got = make().train(torch.from_numpy(images), crops, flips, alphas).numpy()
    assert got.shape == (n, 3, 224, 224)
    for i in range(n):
        expected = expected_train_input(images[i], *crops[i], flips[i], alphas[i])
        # float32 against float64: values are at most ~512 in size, where one float32
        # rounding is at most ulp(512)/2 = 3.1e-5; the device does four roundings (the
        # subtraction, the lighting shift's product, sum and add), so |error| < 1.3e-4.
        # atol=1e-3 holds on any IEEE-754 machine whatever the summation order.
        np.testing.assert_allclose(got[i].transpose(1, 2, 0), expected, rtol=0, atol=1e-3)


def test_crop_and_mirror_move_pixels_exactly():
    """With a zero mean and no lighting the input is the uint8 patch itself, bit for bit:
    the gather picks the right pixels, mirrored ones right to left."""
    n = 4
    images = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    crops = np.array([[0, 32], [32, 0], [5, 27], [31, 1]], np.int16)
    flips = np.array([1, 0, 1, 0], np.uint8)
    t = InputTransform(np.zeros((256, 256, 3), np.float32), EIGVALS, EIGVECS, lighting=False)
    got = t.train(torch.from_numpy(images), crops, flips, np.zeros((n, 3), np.float32)).numpy()
    for i, (top, left) in enumerate(crops):
        patch = images[i, top:top + 224, left:left + 224]
        patch = patch[:, ::-1] if flips[i] else patch
        assert np.array_equal(got[i].transpose(1, 2, 0), patch.astype(np.float32))


def test_lighting_off_leaves_only_the_mean_subtraction():
    images = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    t = InputTransform(MEAN, EIGVALS, EIGVECS, lighting=False)
    got = t.train(torch.from_numpy(images), np.zeros((2, 2), np.int16), np.zeros(2, np.uint8),
                  np.ones((2, 3), np.float32)).numpy()
    # uint8 -> float32 is exact and the subtraction is one correctly rounded float32 op,
    # the same one numpy does: equal bit for bit.
    assert np.array_equal(got.transpose(0, 2, 3, 1), images[:, :224, :224].astype(np.float32) - MEAN[:224, :224])


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


def test_patches_cut_by_the_decoder_get_only_the_mean_and_lighting():
    """DALI hands over 224x224 patches already cut and mirrored: the transform must not cut
    them again, only subtract the mean cut with the same draws and add the lighting."""
    n = 3
    images = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    crops = np.array([[3, 30], [32, 0], [17, 9]], np.int16)
    flips = np.array([1, 0, 1], np.uint8)
    alphas = rng.normal(0, 0.1, (n, 3)).astype(np.float32)
    patches = np.stack([crop_of(images[i], *crops[i], flips[i]) for i in range(n)])
    t = make()
    cut_here = t.train(torch.from_numpy(images), crops, flips, alphas)
    cut_before = t.train(torch.from_numpy(np.ascontiguousarray(patches)), crops, flips, alphas)
    assert torch.equal(cut_here, cut_before)


def crop_of(image, top, left, flipped):
    patch = image[top:top + 224, left:left + 224]
    return patch[:, ::-1] if flipped else patch
