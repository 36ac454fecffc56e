"""Pluggable pretrained encoders (e.g. pathology foundation models) fused into the per-nucleus embedding.

An encoder is any :class:`torch.nn.Module` mapping an RGB batch ``(B, 3, H, W)`` to feature maps ``(B, C, h, w)`` or
tokens ``(B, N, C)``, or a timm model built by name with weights read from a local file. :class:`FeatureEncoder` wraps
it: it turns the network's channel-standardised tile back into RGB in ``[0, 1]`` (the tile store's statistics),
resizes it to the encoder's input size, normalises it the encoder's way, runs it (frozen: eval mode, no gradient), turns
tokens into a patch grid, averages the features bilinearly resized to the tile under each nucleus and over the tile,
and projects ``[cell mean, tile mean]`` (layer norm, linear, ReLU) to ``out_features`` values that
:class:`~ghist._model._network.GHISTNetwork` concatenates to the inputs of its embedding MLP.

Concatenation (rather than a gated sum) lets the embedding MLP combine both sources non-linearly from the first
step; the layer norm puts foundation-model features, whose scale differs from model to model, on the scale of
ghist's own pooled features. Nothing is downloaded: timm models are built with ``pretrained=False``, and names of
the form ``hf-hub:<repo>`` are accepted only for the presets below (which map them to a timm architecture).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_int

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "FeatureEncoder", "pool_resized", "prepare_encoder", "read_weights"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Offline recipes for pathology foundation models: timm architecture, its keyword arguments (layer classes named as
#: strings, resolved when built), input size and normalisation (RGB in [0, 1]). Token layouts (class + register
#: tokens) come from timm's ``num_prefix_tokens`` of the built model.
PRESETS: dict[str, dict[str, Any]] = {
    "hf-hub:MahmoodLab/UNI2-h": {
        "arch": "vit_giant_patch14_224",
        "kwargs": {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": "timm.layers.SwiGLUPacked",
            "act_layer": "torch.nn.SiLU",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        "input_size": 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    },
    "hf-hub:bioptimus/H-optimus-0": {
        "arch": "vit_giant_patch14_reg4_dinov2",
        "kwargs": {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        "input_size": 224,
        "mean": (0.707223, 0.578729, 0.703617),
        "std": (0.211883, 0.230117, 0.177517),
    },
    "hf-hub:paige-ai/Virchow2": {
        "arch": "vit_huge_patch14_224",
        "kwargs": {
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "timm.layers.SwiGLUPacked",
            "act_layer": "torch.nn.SiLU",
        },
        "input_size": 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    },
}
_LAYER_NAMES = {"timm.layers.SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "torch.nn.SiLU": ("torch.nn", "SiLU")}
OPTIONS = ("name", "input_size", "mean", "std", "num_prefix_tokens", "patch_grid", "timm_kwargs", "out_features")


# ---------------------------------------------------------------------------------------------- weights files
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` file or a torch file, without running any code from it.

    ``.safetensors`` files are parsed directly (a JSON header and raw little-endian tensors); anything else goes
    through ``torch.load(..., weights_only=True)``, which refuses pickles of arbitrary objects. A torch file holding
    ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file cannot be read safely, or holds something else than a dict of tensors (the message names it).

    """
    from ._safe_load import safe_torch_load

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`encoder_weights` file not found: {str(path)!r}.")
    expected = "a dict of tensors (a .safetensors file, or a torch state dict such as pytorch_model.bin)"
    if path.suffix == ".safetensors":
        try:
            tensors = _read_safetensors(path)
        except (ValueError, KeyError, struct.error, RuntimeError, json.JSONDecodeError) as err:
            raise ValueError(f"`encoder_weights` {str(path)!r} is not a readable .safetensors file ({err}).") from err
    else:
        tensors = safe_torch_load(path, what="`encoder_weights`", expected=expected)
        for key in ("state_dict", "model"):
            if isinstance(tensors, dict) and isinstance(tensors.get(key), dict):
                tensors = tensors[key]
                break
    if (
        not isinstance(tensors, Mapping)
        or not tensors
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
    ):
        raise ValueError(f"`encoder_weights` {str(path)!r} holds a {type(tensors).__name__}; expected {expected}.")
    return dict(tensors)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    if n <= 0 or 8 + n > len(data):
        raise ValueError(f"header of {n} bytes does not fit a file of {len(data)} bytes")
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = (int(v) for v in info["data_offsets"])
        shape = [int(s) for s in info["shape"]]
        if not 0 <= start <= end <= len(body):
            raise ValueError(f"tensor {name!r} lies outside the file")
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(shape)
    return out


# ---------------------------------------------------------------------------------------------- building
def _resolve_layers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import importlib

    out = dict(kwargs)
    for key, value in kwargs.items():
        if isinstance(value, str) and value in _LAYER_NAMES:
            module, attr = _LAYER_NAMES[value]
            out[key] = getattr(importlib.import_module(module), attr)
    return out


def build_timm(name: str, kwargs: Mapping[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model for ``name`` (a preset ``hf-hub:`` name or a timm architecture), never downloading anything.

    Returns the model and the preset used (empty for a plain architecture name).
    """
    preset = PRESETS.get(name, {})
    if name.startswith(("hf-hub:", "hf_hub:")) and not preset:
        raise ValueError(
            f"`encoder` {name!r} is not one of ghist's offline presets {sorted(PRESETS)}; ghist never downloads, so "
            "pass the timm architecture name instead (e.g. 'vit_large_patch16_224') with the model card's keyword "
            "arguments in `encoder_options={'timm_kwargs': {...}}` and the weights file in `encoder_weights`."
        )
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"`encoder={name!r}` needs timm: `pip install 'ghist[encoders]'` (or pass the nn.Module itself). "
            f"Importing timm failed with: {err}"
        ) from err
    arch = preset.get("arch", name)
    merged = {**preset.get("kwargs", {}), **dict(kwargs or {})}
    merged.setdefault("num_classes", 0)
    return timm.create_model(arch, pretrained=False, **_resolve_layers(merged)), preset


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_rgb_stats(name: str, value: Any) -> list[float]:
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
        raise ValueError(
            f"`encoder_options['{name}']` must be 3 finite numbers (RGB in [0, 1]{', > 0' * (name == 'std')}); "
            f"got {value!r}."
        )
    return values


def prepare_encoder(
    encoder: nn.Module | str,
    *,
    weights: str | os.PathLike | None = None,
    trainable: bool = False,
    options: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Check ``fit``'s encoder arguments, build a timm encoder, load weights and describe it as JSON.

    Returns the module (a copy of a module passed: training never changes the caller's) and its settings
    (``kind``, ``name``, ``class``, ``label``, ``input_size``, ``mean``, ``std``, ``num_prefix_tokens``,
    ``patch_grid``, ``out_features``, ``trainable``, ``timm_kwargs``); :class:`FeatureEncoder` adds the output size
    and token layout found by a probe forward pass.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"`encoder_options` has unknown keys {unknown}; expected some of {list(OPTIONS)}.")
    if not isinstance(trainable, bool):
        raise TypeError(f"`encoder_trainable` must be True or False; got {trainable!r}.")
    timm_kwargs = options.get("timm_kwargs") or {}
    if not isinstance(timm_kwargs, Mapping):
        raise TypeError(f"`encoder_options['timm_kwargs']` must be a dict; got {type(timm_kwargs).__name__}.")
    try:
        timm_kwargs = json.loads(json.dumps(dict(timm_kwargs), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"`encoder_options['timm_kwargs']` must hold JSON values only (saved with the model; layer classes by "
            f"name, e.g. {sorted(_LAYER_NAMES)}): {err}"
        ) from err
    preset: dict[str, Any] = {}
    if isinstance(encoder, str):
        module, preset = build_timm(encoder, timm_kwargs)
        kind, name = "timm", encoder
        if weights is None:
            raise ValueError(
                f"`encoder={encoder!r}` needs `encoder_weights`, a local weights file (.safetensors or .bin/.pt): "
                "ghist never downloads weights."
            )
    elif isinstance(encoder, nn.Module):
        if timm_kwargs:
            raise ValueError("`encoder_options['timm_kwargs']` only applies to an encoder given by timm name.")
        module, kind, name = encoder, "module", _class_name(encoder)
    else:
        raise TypeError(
            f"`encoder` must be a torch.nn.Module or a timm model name; got {type(encoder).__name__} {encoder!r:.60}."
        )
    if weights is not None:
        state = read_weights(weights)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"`encoder_weights` {str(weights)!r} do not fit the encoder {name!r}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}."
            )
    input_size = options.get("input_size", preset.get("input_size"))
    check_int("encoder_options['input_size']", input_size, 1, optional=True)
    label = options.get("name")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"`encoder_options['name']` must be a string; got {label!r}.")
    grid = options.get("patch_grid")
    if grid is not None:
        if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
            raise ValueError(f"`encoder_options['patch_grid']` must be (rows, columns) of patches; got {grid!r}.")
        grid = [int(g) for g in grid]
    prefix = options.get("num_prefix_tokens")
    check_int("encoder_options['num_prefix_tokens']", prefix, 0, optional=True)
    if prefix is None and isinstance(getattr(module, "num_prefix_tokens", None), int):
        prefix = int(module.num_prefix_tokens)  # timm's ViTs: class + register tokens
    out_features = options.get("out_features")
    check_int("encoder_options['out_features']", out_features, 1, optional=True)
    config = {
        "kind": kind,
        "name": name,
        "class": _class_name(module),
        "label": label,
        "input_size": input_size,
        "mean": _check_rgb_stats("mean", options.get("mean", preset.get("mean", IMAGENET_MEAN))),
        "std": _check_rgb_stats("std", options.get("std", preset.get("std", IMAGENET_STD))),
        "num_prefix_tokens": prefix,
        "patch_grid": grid,
        "trainable": trainable,
        "timm_kwargs": timm_kwargs if kind == "timm" else None,
        "out_features": out_features,
    }
    return copy.deepcopy(module) if kind == "module" else module, config


def probe(module: nn.Module, config: Mapping[str, Any], tile_size: int) -> dict[str, Any]:
    """Run the encoder once on a blank tile: its output size ``out_dim``, token layout and patch grid."""
    size = config["input_size"] or tile_size
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = _call(module, torch.zeros(1, 3, size, size, device=_device_of(module)), config["kind"] == "timm")
    finally:
        module.train(was_training)
    if out.ndim == 4:
        return {"out_dim": int(out.shape[1]), "num_prefix_tokens": None, "patch_grid": None, "output": "map"}
    prefix, grid = _token_layout(out.shape[1], config.get("num_prefix_tokens"), config.get("patch_grid"))
    return {"out_dim": int(out.shape[2]), "num_prefix_tokens": prefix, "patch_grid": grid, "output": "tokens"}


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _call(module: nn.Module, x: torch.Tensor, timm_model: bool) -> torch.Tensor:
    # timm models give their token sequence or last feature map through forward_features (forward pools them).
    out = module.forward_features(x) if timm_model else module(x)
    if isinstance(out, list | tuple):
        out = out[-1]
    if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4) or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"The encoder returned {shape} for an input {tuple(x.shape)}; expected feature maps (B, C, h, w) or "
            "tokens (B, N, C). A model that pools to (B, C) must return its features before pooling."
        )
    return out


def _token_layout(n: int, prefix: int | None, grid: Sequence[int] | None) -> tuple[int, list[int]]:
    """Prefix tokens and patch grid of ``n`` tokens: given, or the largest square grid that fits."""
    if grid is not None:
        prefix = n - grid[0] * grid[1] if prefix is None else prefix
        if prefix < 0 or prefix + grid[0] * grid[1] != n:
            raise ValueError(
                f"The encoder returned {n} tokens; `patch_grid` {list(grid)} with `num_prefix_tokens` {prefix} "
                "does not account for them."
            )
        return int(prefix), [int(g) for g in grid]
    if prefix is not None:
        side = math.isqrt(max(n - prefix, 0))
        if prefix >= n or side * side != n - prefix:
            raise ValueError(
                f"The encoder returned {n} tokens; after {prefix} prefix tokens the {n - prefix} left are not a square "
                "grid: give `encoder_options['patch_grid']` (rows, columns)."
            )
        return int(prefix), [side, side]
    side = math.isqrt(n)
    # The largest square is the patch grid as long as fewer than 2 * side + 1 prefix tokens precede it.
    logger.info("Encoder tokens: %d = %d prefix + %d x %d patches (inferred)", n, n - side * side, side, side)
    return n - side * side, [side, side]


# ---------------------------------------------------------------------------------------------- pooling
def _taps(size_in: int, size_out: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output position, the two source indices and weights of ``F.interpolate(mode="linear")``."""
    eye = torch.eye(size_in, dtype=torch.float32, device=like.device).unsqueeze(0)
    weights = F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T  # (out, in)
    values, index = weights.topk(min(2, size_in), dim=1)
    return index, values


def pool_resized(
    features: torch.Tensor, labels: torch.Tensor, cell_batch: torch.Tensor, n_cells: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of ``features`` bilinearly resized to the labels' size, under each nucleus and over each tile.

    Equal to ``segment_pool([F.interpolate(features, size=labels.shape[-2:], mode="bilinear")], labels, n_cells)``
    and the tile means of that map, without building it (a 1536-channel 256 x 256 map is 400 MB per tile): each
    resized pixel is a weighted sum of at most 4 source cells, so a nucleus' mean is a weighted sum of source cells
    whose weights one segment reduction over the foreground pixels gives.

    Returns
    -------
    ``(cell_means, tile_means)``: ``(N, C)`` and ``(B, C)`` float32.

    """
    b, c, h, w = features.shape
    _, size_y, size_x = labels.shape
    iy, wy = _taps(h, size_y, features)
    ix, wx = _taps(w, size_x, features)
    flat = labels.reshape(-1)
    fg = torch.nonzero(flat > 0).squeeze(1)
    seg = flat.index_select(0, fg) - 1
    y, x = (fg // size_x) % size_y, fg % size_x
    grid = features.float().permute(0, 2, 3, 1).reshape(b, h * w, c)
    weights = torch.zeros(n_cells * h * w, dtype=torch.float32, device=features.device)
    for ty in range(iy.shape[1]):
        for tx in range(ix.shape[1]):
            cell = iy[y, ty] * w + ix[x, tx]
            weights.index_add_(0, seg * (h * w) + cell, wy[y, ty] * wx[x, tx])
    weights = weights.reshape(n_cells, h * w)
    area = torch.bincount(seg, minlength=n_cells).clamp(min=1).unsqueeze(1).to(weights.dtype)
    weights = weights / area
    cell_means = torch.zeros(n_cells, c, dtype=torch.float32, device=features.device)
    for tile in range(b):  # a loop over the few tiles of a batch, never over cells
        rows = torch.nonzero(cell_batch == tile).squeeze(1)
        if rows.numel():
            cell_means[rows] = weights[rows] @ grid[tile]
    # The mean of the whole resized map: per-axis mean weights of the source rows and columns.
    mean_y = torch.zeros(h, device=features.device).index_add_(0, iy.reshape(-1), wy.reshape(-1)) / size_y
    mean_x = torch.zeros(w, device=features.device).index_add_(0, ix.reshape(-1), wx.reshape(-1)) / size_x
    tile_means = grid.transpose(1, 2) @ torch.outer(mean_y, mean_x).reshape(h * w)
    return cell_means, tile_means


# ---------------------------------------------------------------------------------------------- the module
class FeatureEncoder(nn.Module):
    """A pretrained encoder's per-nucleus features, projected for the cell embedding (see the module docstring).

    Parameters
    ----------
    module
        The encoder.
    config
        Its settings from :func:`prepare_encoder`, or as saved with a model; one probe forward pass on a blank tile
        adds (or, for a saved model, checks) ``out_dim``, ``output`` and the token layout. Kept as :attr:`config`.
    tile_mean, tile_std
        Per-channel statistics (0-255) that standardised the network's input tiles.
    tile_size
        Side of the network's tiles (the encoder's input without an ``input_size``).
    out_features
        Size of the projection when ``config`` does not give ``out_features``.

    """

    def __init__(
        self,
        module: nn.Module,
        config: Mapping[str, Any],
        *,
        tile_mean: Sequence[float],
        tile_std: Sequence[float],
        tile_size: int,
        out_features: int,
    ):
        super().__init__()
        config = dict(config)
        found = probe(module, config, tile_size)
        for key, value in found.items():
            if key in config and config[key] is not None and config[key] != value:
                raise ValueError(
                    f"The encoder gives {key}={value!r} on a blank tile; the model was trained with {config[key]!r}: "
                    "pass an encoder of the same architecture and settings."
                )
        config.update(found)
        config["out_features"] = int(config.get("out_features") or out_features)
        self.config = config
        self.model = module
        self.trainable = bool(config["trainable"])
        self.out_features = config["out_features"]
        self.model.requires_grad_(self.trainable)
        # Not persistent: these come from the JSON settings, the state dict holds the encoder's own tensors.
        for name, values in (
            ("tile_mean", tile_mean),
            ("tile_std", tile_std),
            ("enc_mean", config["mean"]),
            ("enc_std", config["std"]),
        ):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        dim = int(config["out_dim"])
        self.project = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, self.out_features), nn.ReLU())
        if not self.trainable:
            self.model.eval()

    def train(self, mode: bool = True) -> FeatureEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # a frozen encoder keeps its batch-norm statistics and dropout off
        return self

    def encoder_input(self, image: torch.Tensor) -> torch.Tensor:
        """The standardised tiles as the encoder expects them: RGB in [0, 1], resized, its normalisation."""
        rgb = (image.float() * self.tile_std + self.tile_mean).div(255.0).clamp(0.0, 1.0)
        size = self.config["input_size"]
        if size is not None and tuple(rgb.shape[-2:]) != (size, size):
            rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (rgb - self.enc_mean) / self.enc_std

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        """The encoder's output on ``image`` (standardised tiles) as a ``(B, C, h, w)`` map."""
        x = self.encoder_input(image)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = _call(self.model, x, self.config["kind"] == "timm")
        if out.ndim == 4:
            return out
        prefix, (gh, gw) = self.config["num_prefix_tokens"], self.config["patch_grid"]
        if out.shape[1] != prefix + gh * gw:
            raise ValueError(
                f"The encoder returned {out.shape[1]} tokens; at fit it returned {prefix} prefix tokens + {gh} x {gw} "
                "patches."
            )
        return out[:, prefix:].transpose(1, 2).reshape(out.shape[0], out.shape[2], gh, gw)

    def forward(
        self, image: torch.Tensor, labels: torch.Tensor, cell_batch: torch.Tensor, n_cells: int
    ) -> torch.Tensor:
        """``(N, out_features)`` projected ``[nucleus mean, tile mean]`` of the encoder's features."""
        cell_means, tile_means = pool_resized(self.feature_map(image), labels, cell_batch, n_cells)
        return self.project(torch.cat([cell_means, tile_means[cell_batch]], dim=1))


def encoder_for_load(config: Mapping[str, Any], module: nn.Module | None) -> nn.Module:
    """The encoder module of a saved model: the one passed (checked against the settings), or rebuilt by timm name."""
    saved = config.get("label") or config["name"]
    if module is None:
        if config["kind"] == "module":
            raise ValueError(
                f"This model was trained with the custom encoder {saved!r} (class {config['class']}); its weights are "
                "saved with the model, but its code is not: pass a module of the same architecture, "
                "`GHISTModel.load(path, encoder=MyEncoder(...))`."
            )
        module, _ = build_timm(config["name"], config.get("timm_kwargs"))
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"`encoder` must be a torch.nn.Module; got {type(module).__name__}.")
    if _class_name(module) != config["class"]:
        raise ValueError(
            f"The `encoder` passed is a {_class_name(module)}; this model was trained with {saved!r}, a "
            f"{config['class']}. Pass a module of the same architecture."
        )
    return module


def check_encoder_weights(network: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Name the encoder tensors that the saved weights lack, add, or hold in another shape."""
    prefix = "feature_encoder.model."
    own = {k: v for k, v in network.state_dict().items() if k.startswith(prefix)}
    saved = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    wrong = [
        f"{k[len(prefix) :]} {tuple(saved[k].shape)} saved, {tuple(v.shape)} in the module"
        for k, v in own.items()
        if k in saved and saved[k].shape != v.shape
    ]
    missing = sorted(k[len(prefix) :] for k in set(own) - set(saved))
    extra = sorted(k[len(prefix) :] for k in set(saved) - set(own))
    if wrong or missing or extra:
        raise ValueError(
            "The `encoder` passed does not match the saved encoder's weights: "
            + "; ".join(
                part
                for part in (
                    f"other shapes: {wrong[:3]}" if wrong else "",
                    f"not saved: {missing[:3]}" if missing else "",
                    f"not in the module: {extra[:3]}" if extra else "",
                )
                if part
            )
            + "."
        )
