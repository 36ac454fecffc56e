"""UNet3+-style encoder-decoder used as the GHIST backbone (``docs/method.md``), trained from scratch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "UNet3Plus", "fuse_conv_bn_"]


class ConvBNReLU(nn.Module):
    """``kernel_size`` convolution (no bias), batch norm and ReLU.

    After :meth:`fuse_` (eval only) the batch norm is folded into the convolution, which then carries a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse_(self) -> None:
        """Fold the batch norm's running statistics into the convolution (inference only)."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        if bn.training:
            raise RuntimeError("Fuse batch norm into the convolution only in eval mode (call `.eval()` first).")
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = self.conv
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=True,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
        if conv.weight.is_contiguous(memory_format=torch.channels_last):
            fused = fused.to(memory_format=torch.channels_last)
        self.conv = fused
        self.bn = nn.Identity()


def fuse_conv_bn_(module: nn.Module) -> nn.Module:
    """Fold every :class:`ConvBNReLU`'s batch norm into its convolution, in place; returns ``module``."""
    for sub in module.modules():
        if isinstance(sub, ConvBNReLU):
            sub.fuse_()
    return module


class UNet3Plus(nn.Module):
    """UNet3+-style encoder-decoder with full-scale skip fusion.

    Five encoder levels with ``width * (1, 2, 4, 8, 16)`` channels, each two 3x3 conv-BN-ReLU, max-pooling by 2
    between levels. Each of the four decoder levels fuses all five scales: finer encoder maps max-pooled down,
    the same-level encoder map, and deeper decoder maps (the deepest "decoder" map is the fifth encoder level)
    resampled up, each brought to ``width`` channels by a 3x3 conv-BN-ReLU; the ``5 * width`` concatenated
    channels go through one more 3x3 conv-BN-ReLU. A 1x1 convolution of the finest decoder map gives the
    per-pixel class logits.

    Parameters
    ----------
    in_channels
        Channels of the input image.
    n_classes
        Per-pixel output classes.
    width
        Channels of the first encoder level; also the channels contributed by each scale in the decoder.
    upsample_first
        Resample deeper maps to the decoder's scale *before* their ``width``-channel convolution, as in the
        original UNet3+. The default (``False``) convolves at the source scale and then upsamples the
        ``width``-channel result: same parameters, about half the compute and a fraction of the memory
        (the deepest map is otherwise upsampled 16x with ``16 * width`` channels).
    encoder
        Optional replacement encoder (e.g. a pretrained model). Its ``forward`` must return a sequence of five
        maps, the first at the input resolution and each next one at half the previous, and it must expose
        their channel counts as ``out_channels``.

    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 2,
        *,
        width: int = 64,
        upsample_first: bool = False,
        encoder: nn.Module | None = None,
    ):
        super().__init__()
        self.width = width
        self.upsample_first = upsample_first
        if encoder is None:
            channels = [width * m for m in (1, 2, 4, 8, 16)]
            blocks = []
            prev = in_channels
            for c in channels:
                blocks.append(nn.Sequential(ConvBNReLU(prev, c), ConvBNReLU(c, c)))
                prev = c
            self.encoder: nn.Module | None = None
            self.encoder_blocks = nn.ModuleList(blocks)
        else:
            channels = [int(c) for c in getattr(encoder, "out_channels", ())]
            if len(channels) != 5:
                raise ValueError(
                    f"A custom `encoder` must expose `out_channels` with 5 channel counts; got {channels or None}."
                )
            self.encoder = encoder
            self.encoder_blocks = nn.ModuleList()
        self.encoder_channels: tuple[int, ...] = tuple(channels)
        fused = 5 * width
        self.decoder_channels = fused
        # Decoder level i (0 = finest) fuses sources 0..4: encoder maps j <= i, decoder maps i < j <= 3 and the
        # deepest encoder map (j = 4), in that order.
        self.source_convs = nn.ModuleList()
        self.fusion_convs = nn.ModuleList()
        for i in range(4):
            convs = []
            for j in range(5):
                src = channels[j] if (j <= i or j == 4) else fused
                convs.append(ConvBNReLU(src, width))
            self.source_convs.append(nn.ModuleList(convs))
            self.fusion_convs.append(ConvBNReLU(fused, fused))
        self.head = nn.Conv2d(fused, n_classes, 1)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The five encoder maps, finest first."""
        if self.encoder is not None:
            return list(self.encoder(image))
        maps = []
        x = image
        for k, block in enumerate(self.encoder_blocks):
            if k:
                x = F.max_pool2d(x, 2)
            x = block(x)
            maps.append(x)
        return maps

    @staticmethod
    def _down(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        factor = x.shape[-1] // size[-1]
        if factor > 1:
            x = F.max_pool2d(x, factor)
        if x.shape[-2:] != size:
            x = F.adaptive_max_pool2d(x, size)
        return x

    @staticmethod
    def _up(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if x.shape[-2:] == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the backbone.

        Returns
        -------
        ``(pixel_logits, finest_decoder_map, first_encoder_map)`` with shapes ``(B, n_classes, H, W)``,
        ``(B, 5 * width, H, W)`` and ``(B, encoder_channels[0], H, W)``.

        """
        enc = self.encode(image)
        dec: dict[int, torch.Tensor] = {4: enc[4]}
        for i in (3, 2, 1, 0):
            size = enc[i].shape[-2:]
            parts = []
            for j, conv in enumerate(self.source_convs[i]):
                if j < i:
                    parts.append(conv(self._down(enc[j], size)))
                elif j == i:
                    parts.append(conv(enc[j]))
                else:
                    src = dec[j]
                    if self.upsample_first:
                        parts.append(conv(self._up(src, size)))
                    else:
                        parts.append(self._up(conv(src), size))
            dec[i] = self.fusion_convs[i](torch.cat(parts, dim=1))
        return self.head(dec[0]), dec[0], enc[0]
