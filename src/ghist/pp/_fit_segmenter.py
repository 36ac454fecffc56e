"""``fit_segmenter``: train a :class:`NucleusSegmenter` from H&E images with nucleus instance labels."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from spatialdata import SpatialData

from .._constants import IMAGE_KEY, LABELS_KEY
from .._deprecation import renamed_arguments
from .._docs import doc_params, doc_progress
from ._segmenter_model import WORKING_PIXEL_SIZE, NucleusSegmenter
from ._stain_norm import StainStatistics, image_stain_statistics, match_stain

logger = logging.getLogger(__name__)

#: Optimisation steps trained when neither ``max_steps`` nor ``max_time`` is given.
DEFAULT_SEGMENTER_STEPS = 2000
#: Post-processing thresholds (foreground, marker) tried on the validation part after training, the likeliest
#: first (a time budget may end the search early); the best pooled PQ is kept.
THRESHOLD_GRID = tuple(
    sorted(
        ((fg, mk) for fg in (0.4, 0.5, 0.6) for mk in (0.3, 0.4, 0.5, 0.6, 0.7)),
        key=lambda t: (abs(t[0] - 0.5) + abs(t[1] - 0.5), t),
    )
)
#: Share of a ``max_time`` budget spent training; the rest picks the weights and thresholds on validation data.
TRAIN_SHARE = 0.92
_WARMUP_STEPS = 100


class _Sample(NamedTuple):
    rgb: np.ndarray  # (H, W, 3) uint8 at the working pixel size
    labels: np.ndarray  # (H, W) int32 instance ids on the same grid
    targets: np.ndarray  # (2, H, W) float32 from nucleus_targets
    train_rows: int  # rows [0, train_rows) are for training, the rest for validation


@doc_params(progress=doc_progress)
@renamed_arguments(learning_rate="lr")
def fit_segmenter(
    sdata: SpatialData | Sequence[SpatialData],
    image_key: str = IMAGE_KEY,
    labels_key: str = LABELS_KEY,
    *,
    pixel_size: float | Sequence[float | None] | None = None,
    working_pixel_size: float = WORKING_PIXEL_SIZE,
    max_time: Any = None,
    max_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    crop_size: int = 128,
    widths: Sequence[int] = (32, 48, 64, 96),
    unshuffle: int = 2,
    lr: float = 3e-3,
    val_fraction: float = 0.15,
    stain_jitter: float = 0.05,
    scale_jitter: float = 0.2,
    blur_jitter: float = 0.0,
    normalise_stain: bool = True,
    progress: bool = True,
) -> NucleusSegmenter:
    """Train a nucleus segmenter from H&E images and nucleus instance labels drawn on them.

    Any :class:`~spatialdata.SpatialData` holding an RGB H&E image and integer instance labels of its nuclei will
    do (hand annotations, a QuPath export read into labels, Xenium nucleus boundaries registered to the H&E); the
    labels may live on another grid than the image as long as their transformations relate them. Images and labels
    are read whole into memory at the working pixel size, so pass annotated regions rather than whole slides.

    The network (a compact encoder-decoder whose convolutions run on ``unshuffle x unshuffle`` pixel blocks) learns
    two maps: the probability that a pixel lies in a nucleus, and its distance to its nucleus' border relative to
    the nucleus' centre. :func:`~ghist.pp.segment_nuclei` (``method="ghist"``) turns them into nuclei with a
    watershed seeded by the distance peaks. Training draws random ``crop_size`` windows, augmented by stain
    (haematoxylin/eosin concentrations jittered by up to ``stain_jitter``), scale (up to ``scale_jitter`` either
    way), optionally sharpness (half the windows blurred by a Gaussian of up to ``blur_jitter`` working pixels, as
    a softer or coarser scan shows nuclei) and the 8 flips and quarter turns, optimised with AdamW, the learning rate
    warming up for 100 steps and then decaying (cosine) over the budget. The last ``val_fraction`` of each image's
    rows is held out: never trained on, it scores the weights every 200 steps (the best are kept) and, after
    training, chooses the thresholds of the watershed (``fg_threshold``, ``marker_threshold``) that give the best
    panoptic quality on it.

    Parameters
    ----------
    sdata
        One SpatialData or a list of them.
    image_key
        Key of the H&E image (RGB ``uint8``) in each.
    labels_key
        Key of the nucleus instance labels (integers, 0 = background) in each.
    pixel_size
        µm per pixel of the images (one number, or one per SpatialData, ``None`` entries read from the image).
        By default read from each image's transformation to ``"microns"``.
    working_pixel_size
        µm per pixel the network works at; images are resampled to it here and by ``segment_nuclei``. Finer
        sizes separate touching nuclei better and cost more per µm² of tissue (see the benchmarks page).
    max_time
        Training time budget, ``"HH:MM:SS"`` (or ``"DD:HH:MM:SS"``) or a :class:`datetime.timedelta`, as
        :func:`ghist.tl.fit` takes it; the threshold search after training is counted in it.
    max_steps
        Most optimisation steps. Without ``max_time`` and ``max_steps``, 2,000 steps.
    seed
        Seeds the initial weights, the crops and the augmentation: with a step budget (no ``max_time``), two runs on
        the CPU give the same model.
    batch_size, crop_size
        Windows per step and their side (working pixels; rounded up to what the network takes).
    widths, unshuffle
        The network: channels of each encoder level, finest first, and the side of the pixel blocks folded into
        channels before the first convolution.
    lr
        Peak learning rate of AdamW.
    val_fraction
        Fraction of each image's rows held out for validation (at the bottom of each image).
    stain_jitter, scale_jitter, blur_jitter
        Augmentation strengths (0 turns them off): stain concentrations' relative (and optical-density) change,
        relative scale change, and the largest Gaussian blur (σ, working pixels; off by default: trained on CoNSeP
        with ``stain_jitter=0.2, blur_jitter=1`` the model neither scored better on held-out CoNSeP images nor
        found the dark, soft nuclei of a 0.69 µm/px breast scan it had missed; ``normalise_stain`` did, see the
        benchmarks page).
    normalise_stain
        Map every training image's colours to those of all of them pooled (Reinhard's transfer in CIELAB: mean and
        spread of the tissue pixels' L*, a*, b*) and keep these statistics in the model, so that
        :func:`~ghist.pp.segment_nuclei` maps every image it segments to them too: slides stained or scanned
        unlike the training images look like them to the network. ``False``: images are used with their own
        colours, in training and later.
    {progress}

    Returns
    -------
    The trained :class:`~ghist.pp.NucleusSegmenter` (its ``training`` records steps, seconds, seed, the validation
    scores and thresholds chosen); save it with ``.save(path)``.

    Examples
    --------
    >>> import ghist
    >>> sdata = ghist.datasets.synthetic(seed=0)
    >>> seg = ghist.pp.fit_segmenter(sdata, max_steps=20, progress=False)  # doctest: +SKIP
    >>> ghist.pp.segment_nuclei(sdata, method="ghist", model=seg, key_added="nuclei_learned")  # doctest: +SKIP

    """
    import torch
    from tqdm.auto import tqdm

    from .._model._nucleus_net import nucleus_loss
    from .._model._spec import check_max_time
    from .._validation import check_int, check_number, check_seed

    samples_in = [sdata] if isinstance(sdata, SpatialData) else list(sdata) if isinstance(sdata, list | tuple) else None
    if not samples_in or not all(isinstance(s, SpatialData) for s in samples_in):
        raise TypeError(
            f"`sdata` must be a SpatialData or a non-empty list of them, got {type(sdata).__name__}"
            + (f" holding {sorted({type(s).__name__ for s in samples_in})}" if samples_in else "")
            + "."
        )
    sizes = _check_pixel_sizes(pixel_size, len(samples_in))
    budget = check_max_time("max_time", max_time)  # as ghist.tl.fit takes it
    check_int("max_steps", max_steps, 1, optional=True)
    check_seed(seed)
    check_int("batch_size", batch_size, 1)
    check_int("crop_size", crop_size, 16)
    check_int("unshuffle", unshuffle, 1)
    for name, value in (("lr", lr), ("working_pixel_size", working_pixel_size)):
        check_number(name, value)
    for name, value, hi in (
        ("val_fraction", val_fraction, 0.5),
        ("stain_jitter", stain_jitter, 0.5),
        ("blur_jitter", blur_jitter, 4),  # σ in working pixels
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= hi:
            raise ValueError(f"`{name}` must be a number in [0, {hi}], got {value!r}.")
    if not isinstance(normalise_stain, bool):
        raise TypeError(f"`normalise_stain` must be True or False, got {normalise_stain!r}.")
    if isinstance(scale_jitter, bool) or not isinstance(scale_jitter, int | float) or not 0 <= scale_jitter < 1:
        raise ValueError(f"`scale_jitter` must be a number in [0, 1), got {scale_jitter!r}.")
    if max_steps is None and budget is None:
        max_steps = DEFAULT_SEGMENTER_STEPS
    start = time.perf_counter()

    torch.manual_seed(seed)
    model = NucleusSegmenter(pixel_size=working_pixel_size, widths=widths, unshuffle=unshuffle)
    net = model.net
    crop = int(math.ceil(crop_size / net.multiple) * net.multiple)
    samples = [
        _read_sample(s, image_key, labels_key, size, working_pixel_size, val_fraction, crop, i)
        for i, (s, size) in enumerate(zip(samples_in, sizes))
    ]
    input_sizes = sizes_used(samples_in, image_key, sizes)
    if normalise_stain:
        stats = [
            image_stain_statistics(s.images[image_key], size, working_pixel_size)
            for s, size in zip(samples_in, input_sizes)
        ]
        model.stain_reference = StainStatistics.pooled(stats)
        samples = [s._replace(rgb=match_stain(s.rgb, st, model.stain_reference)) for s, st in zip(samples, stats)]
    areas = np.concatenate([np.bincount(s.labels.ravel())[1:] for s in samples])
    areas = areas[areas > 0] * working_pixel_size**2
    if areas.size == 0:
        raise ValueError(f"The labels {labels_key!r} hold no nuclei; nothing to learn from.")
    # The area range segment_nuclei keeps by default: a little beyond what training showed.
    model.min_area_um2 = float(max(0.5 * np.percentile(areas, 0.5), working_pixel_size**2 * 4))
    model.max_area_um2 = float(2.0 * areas.max())
    logger.info(
        "Training a nucleus segmenter on %d image(s), %d nuclei, %.2f Mpx at %g µm/px (validation: the last %d%% of "
        "each image's rows).",
        len(samples),
        areas.size,
        sum(s.train_rows * s.rgb.shape[1] for s in samples) / 1e6,
        working_pixel_size,
        round(100 * val_fraction),
    )

    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    # Channels-last convolutions train faster on CPUs (see the benchmarks page); the network
    # goes back to the standard layout after training.
    net.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    seconds = budget.total_seconds() if budget is not None else math.inf
    train_seconds = seconds * TRAIN_SHARE if budget is not None else math.inf
    val_every = 200
    weights = np.array([s.train_rows * s.rgb.shape[1] for s in samples], dtype=float)
    best_loss, best_state, best_step = math.inf, None, 0
    history: list[dict[str, float]] = [{"step": 0, "val_loss": _validation_loss(net, samples)}]
    bar = tqdm(total=max_steps, desc="Training nucleus segmenter", unit="step", disable=not progress)
    step = 0
    net.train()
    with bar:
        while True:
            elapsed = time.perf_counter() - start
            done = max(step / max_steps if max_steps else 0.0, elapsed / train_seconds if budget else 0.0)
            if done >= 1:
                break
            step_lr = lr * min(1.0, (step + 1) / _WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * min(done, 1)))
            for group in optimiser.param_groups:
                group["lr"] = step_lr
            images, targets = _batch(
                samples, weights, batch_size, crop, rng, generator, stain_jitter, scale_jitter, blur_jitter
            )
            loss, parts = nucleus_loss(net(images.contiguous(memory_format=torch.channels_last)), targets)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if step % val_every == 0:
                val_loss = _validation_loss(net, samples)
                history.append({"step": step, "loss": loss.item(), "val_loss": val_loss, **parts})
                if val_loss < best_loss:
                    best_loss, best_step = val_loss, step
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                net.train()
    val_loss = _validation_loss(net, samples)
    if val_loss < best_loss or best_state is None:
        best_loss, best_step = val_loss, step
    else:
        net.load_state_dict(best_state)
    net.to(memory_format=torch.contiguous_format)
    net.eval()
    search = _choose_thresholds(model, samples, deadline=start + seconds)
    model.fg_threshold, model.marker_threshold = search["fg_threshold"], search["marker_threshold"]
    model.training = {
        "steps": step,
        "best_step": best_step,
        "seconds": round(time.perf_counter() - start, 1),
        "seed": seed,
        "n_images": len(samples),
        "n_nuclei": int(areas.size),
        "input_pixel_sizes": [round(s, 4) for s in input_sizes],
        "batch_size": batch_size,
        "crop_size": crop,
        "lr": lr,
        "val_fraction": val_fraction,
        "stain_jitter": stain_jitter,
        "scale_jitter": scale_jitter,
        "blur_jitter": blur_jitter,
        "normalise_stain": normalise_stain,
        "val_loss": best_loss,
        "val_scores": search["scores"],
        "history": history,
    }
    logger.info(
        "Trained %d steps in %.0f s (best at step %d); validation PQ %.3f, F1 %.3f at fg_threshold=%.2f, "
        "marker_threshold=%.2f.",
        step,
        model.training["seconds"],
        best_step,
        search["scores"].get("pq", float("nan")),
        search["scores"].get("f1", float("nan")),
        model.fg_threshold,
        model.marker_threshold,
    )
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Reading the training data
# ----------------------------------------------------------------------------------------------------------------------


def _check_pixel_sizes(pixel_size: Any, n: int) -> list[float | None]:
    from .._spatial import check_pixel_size

    if pixel_size is None or not isinstance(pixel_size, list | tuple):
        sizes = [pixel_size] * n
    else:
        sizes = list(pixel_size)
        if len(sizes) != n:
            raise ValueError(f"`pixel_size` has {len(sizes)} entries for {n} SpatialData objects; give one each.")
    return [check_pixel_size(s, "pixel_size", optional=True) for s in sizes]


def _input_pixel_size(sdata: SpatialData, image_key: str, given: float | None, index: int) -> float:
    from .._spatial import check_pixel_size, image_pixel_size

    if given is not None:
        return given
    size = image_pixel_size(sdata, image_key)
    if size is None:
        raise ValueError(
            f"Cannot tell the pixel size of image {image_key!r} of SpatialData {index}: it has no transformation to "
            "'microns'. Pass `pixel_size` (µm per pixel)."
        )
    return check_pixel_size(size, "the image's pixel size", where=f" of SpatialData {index}")


def sizes_used(samples: list[SpatialData], image_key: str, sizes: list[float | None]) -> list[float]:
    """The input pixel size of each sample, given or read."""
    return [_input_pixel_size(s, image_key, g, i) for i, (s, g) in enumerate(zip(samples, sizes))]


def _read_sample(
    sdata: SpatialData,
    image_key: str,
    labels_key: str,
    given_size: float | None,
    working: float,
    val_fraction: float,
    crop: int,
    index: int,
) -> _Sample:
    """One SpatialData's image and labels on the working grid, its targets and its training rows."""
    from .._model._nucleus_net import nucleus_targets
    from .._spatial import (
        check_extents,
        element_affine,
        read_image_window,
        read_labels_window,
        working_scale,
    )
    from .._validation import get_image, get_labels, raster_levels

    image = get_image(sdata, image_key)
    labels = get_labels(sdata, labels_key)
    check_extents(sdata, image_key, labels_key)
    size = _input_pixel_size(sdata, image_key, given_size, index)
    scale = working_scale(size, working)
    height, width = max(1, round(image.sizes["y"] * scale)), max(1, round(image.sizes["x"] * scale))
    rgb = read_image_window(raster_levels(sdata.images[image_key]), scale, 0, 0, height, width)
    rgb = np.ascontiguousarray(np.moveaxis(rgb, 0, -1))
    # working pixel -> image pixel -> labels pixel
    matrix = element_affine(sdata, image_key, labels_key) @ np.diag([1 / scale, 1 / scale, 1.0])
    lab = np.asarray(read_labels_window(labels, matrix, 0, 0, height, width))
    if lab.size and lab.min() < 0:
        raise ValueError(f"Labels {labels_key!r} of SpatialData {index} hold negative ids; expected ids >= 0.")
    # Dense ids: labels may number nuclei sparsely (e.g. cell ids in the millions).
    _, dense = np.unique(lab, return_inverse=True)
    dense = dense.reshape(lab.shape).astype(np.int32)
    if lab.min() > 0:  # no background at all: every id is a nucleus
        dense += 1
    train_rows = height - round(height * val_fraction) if val_fraction > 0 else height
    return _Sample(rgb, dense, nucleus_targets(dense), train_rows)


# ----------------------------------------------------------------------------------------------------------------------
# Batches, validation, thresholds
# ----------------------------------------------------------------------------------------------------------------------


def _batch(
    samples: list[_Sample],
    weights: np.ndarray,
    batch_size: int,
    crop: int,
    rng: np.random.Generator,
    generator: Any,
    stain_jitter: float,
    scale_jitter: float,
    blur_jitter: float,
) -> tuple[Any, Any]:
    """``batch_size`` augmented training crops: standardised images ``(B, 3, c, c)`` and targets ``(B, 2, c, c)``."""
    import torch
    import torch.nn.functional as F

    from .._model._network import dihedral_view
    from .._model._nucleus_net import INPUT_MEAN, INPUT_STD, standardise
    from .._model._stain import hed_jitter

    images, targets = [], []
    for _ in range(batch_size):
        sample = samples[rng.choice(len(samples), p=weights / weights.sum())]
        # scale s: a window of crop / s working pixels becomes crop pixels (s > 1 magnifies)
        s = float(np.exp(rng.uniform(math.log(1 - scale_jitter), -math.log(1 - scale_jitter)))) if scale_jitter else 1.0
        side = max(8, round(crop / s))
        rows, cols = sample.train_rows, sample.rgb.shape[1]
        y0 = int(rng.integers(0, max(rows - side, 0) + 1))
        x0 = int(rng.integers(0, max(cols - side, 0) + 1))
        rgb = _padded(sample.rgb[y0 : min(y0 + side, rows), x0 : x0 + side], side, 255)
        tgt = _padded(np.moveaxis(sample.targets[:, y0 : min(y0 + side, rows), x0 : x0 + side], 0, -1), side, 0)
        img = torch.from_numpy(rgb).permute(2, 0, 1).float()[None]
        tg = torch.from_numpy(tgt).permute(2, 0, 1)[None]
        if side != crop:
            img = F.interpolate(img, size=(crop, crop), mode="bilinear", antialias=side > crop, align_corners=False)
            fg = F.interpolate(tg[:, :1], size=(crop, crop), mode="nearest")
            dist = F.interpolate(tg[:, 1:], size=(crop, crop), mode="bilinear", align_corners=False) * fg
            tg = torch.cat([fg, dist], 1)
        if blur_jitter and rng.random() < 0.5:  # half the windows as a softer (lower-resolution) scan would show them
            img = _gaussian_blur(img, float(rng.uniform(0.0, blur_jitter)))
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        images.append(dihedral_view(img, k, flip))
        targets.append(dihedral_view(tg, k, flip))
    x = standardise(torch.cat(images))
    if stain_jitter:
        x = hed_jitter(x, INPUT_MEAN, INPUT_STD, stain_jitter, generator)
    return x.contiguous(), torch.cat(targets).contiguous()


def _gaussian_blur(image: Any, sigma: float) -> Any:
    """``(1, C, H, W)`` float tensor blurred in its two spatial axes by a Gaussian of ``sigma`` pixels (mirrored)."""
    import torch
    from scipy import ndimage as ndi

    if sigma < 0.2:
        return image
    return torch.from_numpy(ndi.gaussian_filter(image.numpy(), (0, 0, sigma, sigma), mode="mirror"))


def _padded(array: np.ndarray, side: int, value: float) -> np.ndarray:
    """``array`` ``(h, w, c)`` padded with ``value`` at the bottom and right to ``side x side``."""
    h, w = array.shape[:2]
    if h == side and w == side:
        return np.ascontiguousarray(array)
    out = np.full((side, side, array.shape[2]), value, dtype=array.dtype)
    out[:h, :w] = array
    return out


def _validation_parts(sample: _Sample) -> tuple[slice, slice] | None:
    rows = sample.rgb.shape[0]
    return None if sample.train_rows >= rows else (slice(sample.train_rows, rows), slice(None))


def _validation_loss(net: Any, samples: list[_Sample]) -> float:
    """Mean loss over the validation parts (each one forward pass); training loss of a crop without them."""
    import torch

    from .._model._nucleus_net import nucleus_loss, standardise

    net.eval()
    losses, pixels = [], []
    with torch.inference_mode():
        for sample in samples:
            part = _validation_parts(sample)
            if part is None:
                continue
            rgb, tgt = (
                _multiple_crop(sample.rgb[part], net.multiple),
                _multiple_crop(np.moveaxis(sample.targets[:, part[0]], 0, -1), net.multiple),
            )
            if rgb is None:
                continue
            x = standardise(torch.from_numpy(rgb).permute(2, 0, 1)[None])
            loss, _ = nucleus_loss(net(x), torch.from_numpy(tgt).permute(2, 0, 1)[None])
            losses.append(float(loss))
            pixels.append(rgb.shape[0] * rgb.shape[1])
    return float(np.average(losses, weights=pixels)) if losses else math.nan


def _multiple_crop(array: np.ndarray, multiple: int) -> np.ndarray | None:
    """The top-left part of ``array`` ``(h, w, c)`` whose sides are multiples of ``multiple`` (mirrored up if small)."""
    h, w = array.shape[:2]
    if h < multiple or w < multiple:
        ph, pw = max(0, multiple - h), max(0, multiple - w)
        array = np.pad(array, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
        h, w = array.shape[:2]
    return np.ascontiguousarray(array[: h - h % multiple, : w - w % multiple])


def _choose_thresholds(model: NucleusSegmenter, samples: list[_Sample], deadline: float) -> dict[str, Any]:
    """The watershed thresholds with the best pooled PQ on the validation parts, and their scores.

    The pairs of :data:`THRESHOLD_GRID` are tried in order until ``deadline`` (``time.perf_counter()``); the first
    is always tried.
    """
    from .._segmentation_scores import SUM_KEYS, scores_from_sums, segmentation_sums
    from ._segmenter_model import instances_from_maps

    parts = []
    for sample in samples:
        part = _validation_parts(sample)
        if part is not None:
            parts.append((model.predict_maps(sample.rgb[part]), sample.labels[part]))
    if not parts:
        return {"fg_threshold": model.fg_threshold, "marker_threshold": model.marker_threshold, "scores": {}}
    min_marker = model.min_marker_um2 / model.pixel_size**2
    best: dict[str, Any] | None = None
    for fg_t, mk_t in THRESHOLD_GRID:
        if best is not None and time.perf_counter() > deadline:
            logger.info("Time budget spent: thresholds chosen among the first %d pairs.", best["n_tried"])
            break
        sums = dict.fromkeys(SUM_KEYS, 0.0)
        for maps, true in parts:
            pred = instances_from_maps(
                maps,
                fg_threshold=fg_t,
                marker_threshold=mk_t,
                min_marker_px=min_marker,
                marker_prominence=model.marker_prominence,
            )
            for key, value in segmentation_sums(true, pred).items():
                sums[key] += value
        scores = scores_from_sums(sums)
        n_tried = 1 if best is None else best["n_tried"] + 1
        if best is None or scores["pq"] > best["scores"]["pq"]:
            best = {"fg_threshold": fg_t, "marker_threshold": mk_t, "scores": scores}
        best["n_tried"] = n_tried
    assert best is not None
    return best
