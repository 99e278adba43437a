"""The pixel statistics of a training set: the per-pixel mean image (§2) and the RGB
covariance whose eigenvectors drive the PCA lighting augmentation (§4.1), summed exactly
so that any split of the work into workers gives the same bytes."""

from __future__ import annotations

import numpy as np

__all__ = ["PixelStats", "eigen_decomposition"]

_GRAM_ROWS = (2**31 - 1) // (255 * 255)  # 33,025 pixels: their Σxxᵀ fits int32


class PixelStats:
    """Exact running sums for the per-pixel mean image and the RGB covariance.

    Integer sums make the result independent of the order partial sums are combined
    in, so 1 worker and 16 workers write byte-identical `mean.npy` and `rgb_eig.json`.
    Bounds: ImageNet's 1.28 M images × 255 per pixel, and 8e10 pixels × 255² in the
    second moments, both stay far below 2**63.

    Cost per 256×256 image, the reason for its shape: the per-position sum is staged in
    uint16 (257 × 255 = 65535 fits) and folded into int64 every 257 images, 4× cheaper
    than adding into int64 each time; Σx over all pixels is never summed per image, it
    is the per-position sum summed at the end; Σxxᵀ is int32 products over blocks that cannot overflow.
    """

    _STAGE = 257  # images a uint16 per-position sum can hold exactly

    def __init__(self, size: int):
        self.size = size
        self.images = 0
        self._pixel_sum = np.zeros((size, size, 3), np.int64)  # Σ x per pixel position
        self._stage = np.zeros((size, size, 3), np.uint16)
        self._staged = 0
        self.rgb_outer = np.zeros((3, 3), np.int64)  # Σ x xᵀ over all pixels

    def add_image(self, image: np.ndarray) -> None:
        assert image.shape == (self.size, self.size, 3) and image.dtype == np.uint8, image.shape
        np.add(self._stage, image, out=self._stage)
        self._staged += 1
        if self._staged == self._STAGE:
            self._fold()
        self.images += 1
        pixels = image.reshape(-1, 3)
        # Σxxᵀ in int32, exact: a block of _GRAM_ROWS pixels sums at most
        # _GRAM_ROWS × 255² < 2**31. Faster than a float64 BLAS product, whose input
        # conversion costs more than the 3×3 result it computes.
        for lo in range(0, len(pixels), _GRAM_ROWS):
            block = pixels[lo:lo + _GRAM_ROWS].astype(np.int32)
            self.rgb_outer += block.T @ block

    def add_sums(self, images: int, pixel_sum: np.ndarray, rgb_outer: np.ndarray) -> None:
        """Add another accumulator's `sums()` (as a worker process sends them)."""
        self.images += images
        self._pixel_sum += pixel_sum
        self.rgb_outer += rgb_outer

    def sums(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(images, per-position sum, Σxxᵀ); the per-position sum in the smallest dtype
        that holds it exactly, to keep what crosses a pipe small."""
        pixel_sum = self.pixel_sum
        if self.images * 255 < 2**32:
            pixel_sum = pixel_sum.astype(np.uint32)
        return self.images, pixel_sum, self.rgb_outer.copy()

    def merge(self, other: "PixelStats") -> None:
        assert other.size == self.size
        self.add_sums(*other.sums())

    @property
    def pixel_sum(self) -> np.ndarray:
        self._fold()
        return self._pixel_sum

    @property
    def rgb_sum(self) -> np.ndarray:
        """Σ x over all pixels (3,)."""
        return self.pixel_sum.sum(axis=(0, 1))

    def _fold(self) -> None:
        if self._staged:
            self._pixel_sum += self._stage
            self._stage.fill(0)
            self._staged = 0

    def mean_image(self) -> np.ndarray:
        if not self.images:
            raise ValueError("no images were added")
        return (self.pixel_sum / self.images).astype(np.float32)

    def mean_rgb(self) -> np.ndarray:
        return self.rgb_sum / (self.images * self.size * self.size)

    def covariance(self) -> np.ndarray:
        """The 3×3 covariance of all pixel values (population form, 0..255 scale)."""
        n = self.images * self.size * self.size
        if not n:
            raise ValueError("no images were added")
        mean = self.rgb_sum / n
        return self.rgb_outer / n - np.outer(mean, mean)

    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigvals (3,), eigvecs (3,3) with eigenvectors as columns), largest first."""
        return eigen_decomposition(self.covariance())


def eigen_decomposition(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """eigh, sorted largest first, each eigenvector's sign fixed (components sum >= 0)
    so the stored file does not depend on the LAPACK build."""
    eigvals, eigvecs = np.linalg.eigh(covariance)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    signs = np.where(eigvecs.sum(axis=0) < 0, -1.0, 1.0)
    return eigvals, eigvecs * signs
