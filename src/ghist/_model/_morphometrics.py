"""Nucleus morphometrics: size, shape, stain and texture of each nucleus, as explicit inputs of the cell embedding.

The cell embedding otherwise sees only the *means* of feature maps over each nucleus, from which a nucleus' size and
the spread of its stain (chromatin texture) can be read only indirectly. Pathologists grade proliferation and atypia
from exactly these (bigger, darker, coarser nuclei), so the network gets them directly, computed in one segment
reduction over the foreground pixels like :func:`~ghist._model._network.segment_pool`:

- shape (3): log visible area, and half-logs of the two eigenvalues of the pixel coordinates' covariance (log major
  and minor axis lengths up to a constant);
- stain (2 x 3): mean and standard deviation of the standardised H&E channels over the nucleus;
- texture (C): standard deviation over the nucleus of each channel of a full-resolution feature map.

A nucleus without a visible pixel gets zeros. Sizes are in pixels of the model's working pixel size, which
:func:`ghist.tl.predict` resamples every slide to, so they mean the same on every slide.
"""

from __future__ import annotations

import torch

__all__ = ["N_SHAPE_FEATURES", "morphometric_features", "n_morphometric_features"]

N_SHAPE_FEATURES = 3
# Variance of a uniformly spread coordinate over one pixel: keeps a one-pixel nucleus' axes finite.
_PIXEL_VARIANCE = 1.0 / 12.0
# Log-area of a typical nucleus at ~0.5 µm/px (~120 px), subtracted so the shape features are O(1) around 0.
_LOG_AREA_CENTRE = 4.8


def n_morphometric_features(image_channels: int, map_channels: int) -> int:
    """Number of morphometric features per nucleus: shape, stain mean and spread, and map texture."""
    return N_SHAPE_FEATURES + 2 * image_channels + map_channels


def morphometric_features(image: torch.Tensor, fmap: torch.Tensor, labels: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Per-nucleus shape, stain and texture features (see the module docstring).

    Parameters
    ----------
    image
        ``(B, 3, H, W)`` standardised H&E tiles.
    fmap
        ``(B, C, H, W)`` a feature map at the labels' resolution (the backbone's first level).
    labels
        ``(B, H, W)`` int64 batch-unique nucleus ids ``1..n_cells``; ``0`` and negative values are ignored.
    n_cells
        Number of nuclei ``N``.

    Returns
    -------
    ``(N, n_morphometric_features(3, C))`` float32.

    Examples
    --------
    >>> image = torch.zeros(1, 3, 8, 8)
    >>> labels = torch.zeros(1, 8, 8, dtype=torch.long)
    >>> labels[0, 1:3, 1:7] = 1  # a 2 x 6 bar: major axis along x
    >>> feats = morphometric_features(image, torch.zeros(1, 4, 8, 8), labels, 2)
    >>> feats.shape, bool(feats[0, 1] > feats[0, 2]), feats[1].abs().sum().item()
    (torch.Size([2, 13]), True, 0.0)

    """
    _, h, w = labels.shape
    flat = labels.reshape(-1)
    fg = torch.nonzero(flat > 0).squeeze(1)
    seg = flat.index_select(0, fg) - 1
    b_idx, p_idx = fg // (h * w), fg % (h * w)
    y, x = (p_idx // w).float(), (p_idx % w).float()
    # (B, C, H, W) -> (B, H*W, C) rows of the foreground pixels only, in float32 whatever the autocast dtype.
    values = torch.cat([m.flatten(2).transpose(1, 2)[b_idx, p_idx].float() for m in (image, fmap)], dim=1)
    area = torch.bincount(seg, minlength=n_cells)
    count = area.clamp(min=1).unsqueeze(1).float()

    def mean(rows: torch.Tensor) -> torch.Tensor:
        return rows.new_zeros(n_cells, rows.shape[1]).index_add_(0, seg, rows) / count

    # Centred on each nucleus' centroid first: E[d^2] stays accurate in float32, unlike E[x^2] - E[x]^2.
    yx = torch.stack([y, x], dim=1)
    d = yx - mean(yx)[seg]
    m = mean(torch.stack([d[:, 0] ** 2, d[:, 1] ** 2, d[:, 0] * d[:, 1]], dim=1))
    var_y, var_x, cov = m[:, 0] + _PIXEL_VARIANCE, m[:, 1] + _PIXEL_VARIANCE, m[:, 2]
    half_trace = (var_y + var_x) / 2
    root = torch.sqrt(((var_y - var_x) / 2) ** 2 + cov**2)
    major, minor = half_trace + root, (half_trace - root).clamp(min=_PIXEL_VARIANCE)
    shape = torch.stack(
        [torch.log(count.squeeze(1)) - _LOG_AREA_CENTRE, 0.5 * torch.log(major), 0.5 * torch.log(minor)], dim=1
    )

    first_moment = mean(values)
    centred = values - first_moment[seg]
    spread = torch.sqrt(mean(centred * centred) + 1e-6)  # the epsilon keeps the gradient finite on flat nuclei
    n_image = image.shape[1]
    feats = torch.cat([shape, first_moment[:, :n_image], spread], dim=1)
    return feats * (area > 0).unsqueeze(1).float()
