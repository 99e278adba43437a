"""On the device: uint8 NHWC batch -> the float NCHW input the network sees.

Four steps of the paper happen here rather than in the augmenters, in one gather on the
device (on the CPU when training on the CPU):
- §4.1: the random 224x224 patch of the whole 256x256 image, mirrored on a coin flip;
- §2: subtract the per-pixel mean *image* of the training set, cut (and mirrored)
  exactly like the sample;
- §4.1: PCA lighting: add sum_i p_i * alpha_i * lambda_i to every pixel.
Why here: it is per-pixel indexing and arithmetic the device does almost for free; on
the CPU the crop and the mirror were each a copy of every image on top of the decode,
and float output would quadruple the bytes crossing PCIe. The price is that whole
images cross PCIe, 256²/224² = 1.31x the bytes of the crops, still as uint8.

Units of the lighting term. The paper's formula adds eigenvalues (variances) to pixel
values, so its size depends on the pixel scale. We follow the convention of the widely
used reproductions (fb.resnet.torch, and torchvision's "Lighting"): the covariance is
taken over pixels in [0, 1], so with pixels in 0..255 the term is
    255 * P @ (alpha * lambda_01),  lambda_01 = lambda_255 / 255**2
which shifts a pixel by a few levels, as the paper's "intensity and colour of the
illumination" intends. (Eigenvalues of the 0..255 covariance used literally would
shift pixels by thousands of levels.)

The network's input is NCHW; we return it as a permuted view of NHWC data, i.e. in
channels_last memory order, which cuDNN prefers anyway.
"""

from __future__ import annotations

import numpy as np
import torch

from alexnetd.pipeline.ring import CROP, IMAGE

__all__ = ["InputTransform", "ten_crop_offsets"]

CENTER = (IMAGE - CROP) // 2


def ten_crop_offsets() -> list[tuple[int, int, bool]]:
    """§4.1 test time: the four corner patches and the centre patch, and their mirrors:
    (top, left, flipped) for each of the 10 views."""
    last = IMAGE - CROP
    five = [(0, 0), (0, last), (last, 0), (last, last), (CENTER, CENTER)]
    return [(t, l, False) for t, l in five] + [(t, l, True) for t, l in five]


class InputTransform:
    def __init__(self, mean_image: np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray,
                 device="cpu", lighting: bool = True):
        self.device = torch.device(device)
        self.mean = torch.as_tensor(np.asarray(mean_image, np.float32), device=self.device)  # (256,256,3)
        self.eigvals01 = torch.as_tensor(np.asarray(eigvals, np.float32) / 255.0 ** 2, device=self.device)
        self.eigvecs = torch.as_tensor(np.asarray(eigvecs, np.float32), device=self.device)  # columns
        self.lighting = lighting
        self._arange = torch.arange(CROP, device=self.device)

    def train(self, images: torch.Tensor, crops, flips, alphas) -> torch.Tensor:
        """(n,256,256,3) uint8 whole images and each sample's draws -> (n,3,224,224)
        float32: the crop at (top, left), mirrored where flipped, minus the mean image
        cut the same way, plus the lighting shift.

        Images that arrive as (n,224,224,3) were already cut and mirrored by their
        decoder, which decoded only each crop's window: only the mean and the lighting
        are left to do, with the same draws."""
        images = images.to(self.device, non_blocking=True)
        rows, cols = self._crop_index(self._to_device(crops).long(), self._to_device(flips).bool())
        if images.shape[1] == CROP:
            x = images.float()
        else:
            # One gather for the pixels and one for the mean, with the same indices.
            batch = torch.arange(len(images), device=self.device)[:, None, None]
            x = images[batch, rows, cols].float()           # (n,224,224,3)
        x -= self.mean[rows, cols]
        if self.lighting:
            x += self.lighting_shift(self._to_device(alphas).float())[:, None, None, :]
        return x.permute(0, 3, 1, 2)

    def lighting_shift(self, alphas: torch.Tensor) -> torch.Tensor:
        """(n,3) per-image RGB shift: 255 * P @ (alpha * lambda_01)."""
        return 255.0 * (alphas * self.eigvals01) @ self.eigvecs.T

    def eval(self, images: torch.Tensor, crops: int = 1) -> torch.Tensor:
        """(n,256,256,3) uint8 images -> (n*crops,3,224,224) float32: the centre patch,
        or the paper's 10 patches per image (image-major: image 0's 10 views first)."""
        x = images.to(self.device, non_blocking=True).float() - self.mean
        if crops == 1:
            views = [(CENTER, CENTER, False)]
        elif crops == 10:
            views = ten_crop_offsets()
        else:
            raise ValueError("crops must be 1 or 10")
        patches = []
        for top, left, flipped in views:
            patch = x[:, top:top + CROP, left:left + CROP]
            patches.append(patch.flip(2) if flipped else patch)
        stacked = torch.stack(patches, dim=1).reshape(-1, CROP, CROP, 3)
        return stacked.permute(0, 3, 1, 2)

    def _to_device(self, array) -> torch.Tensor:
        # non_blocking: torch.as_tensor(..., device=cuda) would wait for the device.
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def _crop_index(self, crops: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices of each sample's patch, (n,224,1) and (n,1,224); a
        mirrored sample reads its columns right to left."""
        rows = crops[:, 0:1] + self._arange            # (n,224)
        cols = crops[:, 1:2] + self._arange            # (n,224)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        return rows[:, :, None], cols[:, None, :]
