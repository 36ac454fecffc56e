"""The learned nucleus segmenter's network, its training targets and its loss (tensors in, tensors out).

A compact encoder-decoder maps an H&E window at the segmenter's working pixel size to two maps per pixel: the
logit of "inside a nucleus" and the logit of the pixel's distance to its nucleus' border, scaled to 1 at the
nucleus' most central pixel. Touching nuclei meet in valleys of that distance, so its peaks seed a watershed that
splits them (the idea shared by DIST, StarDist and HoVer-Net's energy maps, in a form cheap enough for a CPU).

Speed comes from where the convolutions run: the window is folded into ``unshuffle x unshuffle`` pixel blocks
(``pixel_unshuffle``), every convolution runs at that coarser grid or below, and the output is unfolded back
(``pixel_shuffle``), so each output pixel still gets its own value from the full-resolution colours it was
folded from.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_int

#: Output channels: nucleus foreground logit, normalised distance-to-border logit.
N_OUTPUTS = 2

#: Fixed input standardisation of 0-255 RGB (the same for every model, so stain augmentation can invert it).
INPUT_MEAN = (180.0, 130.0, 170.0)
INPUT_STD = (50.0, 60.0, 45.0)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class NucleusNet(nn.Module):
    """Encoder-decoder from standardised RGB ``(B, 3, H, W)`` to ``(B, 2, H, W)`` logits (foreground, distance).

    Parameters
    ----------
    widths
        Channels of each level of the encoder, finest first; each further level halves the grid.
    unshuffle
        Side of the pixel blocks folded into channels before the first convolution.

    ``H`` and ``W`` must be multiples of :attr:`multiple`.

    Examples
    --------
    >>> net = NucleusNet((8, 16, 24), unshuffle=2)
    >>> net(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 2, 32, 32])

    """

    def __init__(self, widths: Sequence[int] = (32, 48, 64, 96), unshuffle: int = 2):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"`widths` must be at least two positive channel counts, got {widths!r}.")
        check_int("unshuffle", unshuffle, 1)
        self.widths = tuple(widths)
        self.unshuffle = int(unshuffle)
        r = self.unshuffle
        self.stem = nn.Sequential(_conv_bn_relu(3 * r * r, widths[0]), _conv_bn_relu(widths[0], widths[0]))
        self.down = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(a, b, stride=2), _conv_bn_relu(b, b)) for a, b in itertools.pairwise(widths)
        )
        # Decoder: the coarser level, projected to the finer level's channels, upsampled and added to its skip.
        self.lateral = nn.ModuleList(nn.Conv2d(b, a, 1) for a, b in itertools.pairwise(widths))
        self.up = nn.ModuleList(_conv_bn_relu(a, a) for a in widths[:-1])
        self.head = nn.Conv2d(widths[0], N_OUTPUTS * r * r, 1)

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (the folding times the encoder's total downsampling)."""
        return self.unshuffle * 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2, H, W)`` of standardised RGB ``(B, 3, H, W)``."""
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"Input sides must be multiples of {self.multiple}, got {h} x {w}.")
        x = self.stem(F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x)
        skips = [x]
        for block in self.down:
            x = block(x)
            skips.append(x)
        for i in range(len(self.up) - 1, -1, -1):
            x = self.up[i](skips[i] + F.interpolate(self.lateral[i](x), scale_factor=2.0, mode="nearest"))
        x = self.head(x)
        return F.pixel_shuffle(x, self.unshuffle) if self.unshuffle > 1 else x

    def receptive_radius(self) -> int:
        """Pixels of context on each side that one output pixel depends on (an upper bound)."""
        r = self.unshuffle
        radius = 2 * r  # the stem's two 3x3 convolutions
        step = r
        for _ in self.down:
            step *= 2
            radius += 2 * step  # two 3x3 convolutions at this level
        radius += sum(r * 2**i for i in range(len(self.up)))  # one 3x3 convolution per decoder level
        return int(radius + r)


def standardise(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` 0-255 RGB (any dtype) -> the network's standardised float32 input."""
    mean = torch.as_tensor(INPUT_MEAN, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    std = torch.as_tensor(INPUT_STD, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    return (rgb.float() - mean) / std


def fuse_batchnorm(net: NucleusNet) -> NucleusNet:
    """``net`` (in eval mode) with each batch norm folded into the convolution before it: same outputs, fewer passes.

    Works in place on ``net`` and returns it; only for inference (the folded model cannot be trained further).
    """
    net.eval()
    for module in net.modules():
        if isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], nn.BatchNorm2d):
            conv, bn = module[0], module[1]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True
            )
            with torch.no_grad():
                fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
                fused.bias.copy_(bn.bias - bn.running_mean * scale)
            module[0] = fused
            module[1] = nn.Identity()
    return net


def nucleus_targets(labels: np.ndarray) -> np.ndarray:
    """``(2, H, W)`` float32 targets of instance labels: foreground (0/1) and normalised distance to the border.

    The distance of each nucleus pixel to the nearest pixel outside its nucleus (background or another nucleus),
    divided by the largest such distance in the nucleus, so every nucleus peaks at 1 whatever its size; 0 outside.
    Being relative, both maps survive rescaling, so scale augmentation may resample them with the image.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    fg = labels > 0
    dist = np.zeros(labels.shape, dtype=np.float32)
    if fg.any():
        # Pixels on the border between two nuclei count as outside both, so touching nuclei get separate peaks.
        inner = fg & ~find_boundaries(labels, mode="inner")
        edt = ndi.distance_transform_edt(inner).astype(np.float32) + fg
        n = int(labels.max()) + 1
        peak = np.zeros(n, dtype=np.float32)
        np.maximum.at(peak, labels.ravel(), edt.ravel())
        peak[0] = 1.0
        dist = np.where(fg, edt / np.maximum(peak[labels], 1e-6), 0.0).astype(np.float32)
    return np.stack([fg.astype(np.float32), dist])


def nucleus_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of ``(B, 2, H, W)`` logits against :func:`nucleus_targets`; the total and its parts.

    Binary cross-entropy plus soft Dice on the foreground (Dice keeps sparse fields of small nuclei from being
    predicted empty), and squared error of the distance map (sigmoid of its logit), counted double inside nuclei
    where the peaks and valleys that seed the watershed lie.
    """
    fg_logit, dist_logit = logits[:, 0], logits[:, 1]
    fg, dist = targets[:, 0], targets[:, 1]
    bce = F.binary_cross_entropy_with_logits(fg_logit, fg)
    prob = torch.sigmoid(fg_logit)
    dice = 1 - (2 * (prob * fg).sum() + 1) / (prob.sum() + fg.sum() + 1)
    weight = 1 + fg
    mse = (weight * (torch.sigmoid(dist_logit) - dist) ** 2).sum() / weight.sum()
    total = bce + dice + 2 * mse
    return total, {"bce": bce.item(), "dice": dice.item(), "dist": mse.item()}
