"""Stain augmentation in haematoxylin-eosin-DAB optical density space (Ruifrok & Johnston's colour deconvolution).

Sections differ in how strongly and in what hue they were stained, and scanners differ in colour response. Jittering
each training tile's stain concentrations (Tellez et al., Medical Image Analysis 2019: "HED" augmentation) teaches
the network that these differences carry no expression signal, which is what a model meeting an unseen section needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Optical density of one unit of each stain (rows: haematoxylin, eosin, DAB; columns: R, G, B), as
#: :data:`skimage.color.rgb_from_hed` has it, and its inverse.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

_MIN_INTENSITY = 1.0 / 255.0  # optical density is capped where a channel is fully absorbed


def hed_jitter(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    strength: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Randomly rescale and shift each tile's stain concentrations; returns standardised images like the input.

    Parameters
    ----------
    images
        ``(B, 3, H, W)`` RGB tiles standardised as ``(rgb - mean) / std`` (``rgb`` in 0-255).
    mean, std
        The per-channel standardisation of ``images``.
    strength
        For each tile and stain, the concentration ``s`` becomes ``s * (1 + a) + b`` with ``a`` and ``b`` uniform in
        ``[-strength, strength]`` (``b`` in optical-density units, in which a dense nucleus is about 1). ``0.05`` is
        Tellez et al.'s "light" setting.
    generator
        Source of the draws (the training augmentation's own, so runs are reproducible).

    Examples
    --------
    >>> import torch
    >>> images = torch.zeros(2, 3, 8, 8)
    >>> out = hed_jitter(images, [200, 150, 180], [40, 50, 40], 0.05, torch.Generator().manual_seed(0))
    >>> out.shape
    torch.Size([2, 3, 8, 8])

    """
    n = images.shape[0]
    draws = torch.rand((2, n, 3), generator=generator, dtype=torch.float64)
    gain, shift = (draws * 2 - 1) * strength
    dtype, device = images.dtype, images.device
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    rgb = (images.float() * std_t + mean_t).div(255.0).clamp(_MIN_INTENSITY, 1.0)
    density = -torch.log(rgb)
    # One (3 x 3) map per tile from RGB density to RGB density: into stains, jitter, back.
    to_hed = torch.as_tensor(HED_FROM_RGB)
    to_rgb = torch.as_tensor(RGB_FROM_HED)
    per_tile = torch.einsum("ck,nk,kd->ncd", to_hed, 1 + gain, to_rgb).float().to(device)
    offset = torch.einsum("nk,kd->nd", shift, to_rgb).float().to(device)
    density = torch.einsum("nchw,ncd->ndhw", density, per_tile) + offset[:, :, None, None]
    rgb = torch.exp(-density).clamp(0.0, 1.0) * 255.0
    return ((rgb - mean_t) / std_t).to(dtype)
