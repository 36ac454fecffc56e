"""``NucleusSegmenter``: a trained nucleus segmenter (network + post-processing settings), its files and its windows.

The network (:mod:`ghist._model._nucleus_net`) predicts, at the segmenter's working pixel size, each pixel's
probability of lying in a nucleus and its relative distance to the nucleus' border. Instances come from a
marker-controlled watershed: the connected regions where the distance is high seed the basins, which grow down the
distance map inside the foreground, so touching nuclei split along the valley between their peaks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._stain_norm import StainMap, StainStatistics

logger = logging.getLogger(__name__)

FORMAT = "ghist-nucleus-segmenter"
FORMAT_VERSION = 1
SETTINGS_FILE = "segmenter.json"
WEIGHTS_FILE = "weights.pt"
SEGMENTER_FILES = (SETTINGS_FILE, WEIGHTS_FILE)

#: Nucleus segmenters shipped with ghist, by name -> folder. None yet: the one development set at hand (CoNSeP)
#: does not allow redistributing weights trained on it.
BUNDLED_SEGMENTERS: dict[str, Path] = {}

#: Working pixel size (µm) of a segmenter by default: finer than 0.5 µm separates touching nuclei better on images held
#: out by image; 0.3 µm scored higher still but outlined stroma as nuclei on a sparse breast scan (benchmarks page).
WORKING_PIXEL_SIZE = 0.375
#: Post-processing defaults, overridable per call (``segment_nuclei(..., method="ghist", fg_threshold=...)``).
POSTPROCESS_KEYS = ("fg_threshold", "marker_threshold", "min_marker_um2", "marker_prominence")
#: Gaussian σ (working pixels) the distance map is smoothed by before its peaks seed the watershed: single-pixel
#: wiggles of the network's output would otherwise count as peaks.
DISTANCE_SMOOTHING = 1.0


class NucleusSegmenter:
    """A learned nucleus segmenter: made by :func:`ghist.pp.fit_segmenter`, used by :func:`ghist.pp.segment_nuclei`.

    Parameters
    ----------
    pixel_size
        Working pixel size (µm per pixel) the network sees; windows at other sizes are resampled to it.
    widths
        Channels of each encoder level of the network, finest first.
    unshuffle
        Side of the pixel blocks folded into channels before the first convolution.
    fg_threshold
        A pixel is nucleus when its predicted foreground probability is above this.
    marker_threshold
        Seeds of the watershed: connected regions where the predicted relative distance to the border is above this.
    min_marker_um2
        Seeds smaller than this area (µm²) are dropped (noise peaks would split a nucleus).
    marker_prominence
        A seed region holding several peaks of the distance map is split into them when each rises at least this far
        (in relative distance, 0-1) above the lowest point on the way to a higher peak: touching nuclei whose
        distance valley stays above ``marker_threshold`` are still told apart. ``0`` keeps seed regions whole.
    min_area_um2, max_area_um2
        Range of nucleus areas seen in training; :func:`~ghist.pp.segment_nuclei` keeps nuclei in it by default.
    stain_reference
        Colour statistics of the training images (CIELAB mean and spread of their tissue pixels), set by
        :func:`~ghist.pp.fit_segmenter`: images are mapped to them before the network sees them. ``None``: images
        are segmented with their own colours.
    training
        What the model was trained on and how (steps, seconds, seed, validation scores), kept in its settings file.

    Examples
    --------
    >>> import ghist
    >>> seg = ghist.pp.NucleusSegmenter(pixel_size=0.5, widths=(8, 16))
    >>> seg.pixel_size
    0.5

    """

    def __init__(
        self,
        *,
        pixel_size: float = WORKING_PIXEL_SIZE,
        widths: Sequence[int] = (32, 48, 64, 96),
        unshuffle: int = 2,
        fg_threshold: float = 0.5,
        marker_threshold: float = 0.5,
        min_marker_um2: float = 1.0,
        marker_prominence: float = 0.1,
        min_area_um2: float = 2.0,
        max_area_um2: float = 200.0,
        stain_reference: StainStatistics | None = None,
        training: dict[str, Any] | None = None,
    ):
        from .._model._nucleus_net import NucleusNet
        from .._spatial import check_pixel_size

        self.pixel_size = check_pixel_size(pixel_size, "pixel_size")
        self.net = NucleusNet(widths, unshuffle)
        self.net.eval()
        self.fg_threshold = _unit_interval("fg_threshold", fg_threshold)
        self.marker_threshold = _unit_interval("marker_threshold", marker_threshold)
        self.min_marker_um2 = float(min_marker_um2)
        self.marker_prominence = _unit_interval("marker_prominence", marker_prominence)
        self.min_area_um2 = float(min_area_um2)
        self.max_area_um2 = float(max_area_um2)
        if stain_reference is not None and not isinstance(stain_reference, StainStatistics):
            raise TypeError(f"`stain_reference` must be StainStatistics or None, got {type(stain_reference).__name__}.")
        self.stain_reference = stain_reference
        self.training = dict(training or {})
        self._lock = threading.Lock()
        self._inference_net: Any = None

    # ------------------------------------------------------------------------------------------------------------------
    # Settings and files
    # ------------------------------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-ready values."""
        from .._version import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ghist_version": __version__,
            "pixel_size": self.pixel_size,
            "widths": list(self.net.widths),
            "unshuffle": self.net.unshuffle,
            "fg_threshold": self.fg_threshold,
            "marker_threshold": self.marker_threshold,
            "min_marker_um2": self.min_marker_um2,
            "marker_prominence": self.marker_prominence,
            "min_area_um2": self.min_area_um2,
            "max_area_um2": self.max_area_um2,
            "stain_reference": None if self.stain_reference is None else self.stain_reference.to_json(),
            "training": self.training,
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save into folder ``path``: ``weights.pt`` (the network's tensors) and ``segmenter.json`` (the rest).

        The folder is written beside its destination and moved into place, so an interrupted save leaves nothing
        half-written; :meth:`load` reads the weights with ``weights_only=True`` (no code runs).

        Parameters
        ----------
        path
            Destination folder.
        overwrite
            Replace an earlier nucleus segmenter saved there. Any other folder or file is refused with a
            ``FileExistsError`` and left as it is.

        Examples
        --------
        >>> import ghist, tempfile
        >>> seg = ghist.pp.NucleusSegmenter(widths=(8, 16))
        >>> folder = tempfile.mkdtemp() + "/segmenter"
        >>> seg.save(folder)
        >>> ghist.pp.NucleusSegmenter.load(folder).net.widths
        (8, 16)

        """
        import torch

        from .._folders import replace_folder

        settings = self.settings()
        tensors = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}

        def write(tmp: Path) -> None:
            torch.save(tensors, tmp / WEIGHTS_FILE)
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, allow_nan=False))

        replace_folder(
            path,
            write,
            overwrite=overwrite,
            is_ours=is_segmenter_folder,
            own_names=SEGMENTER_FILES,
            what="ghist nucleus segmenter",
        )
        logger.info("Saved the nucleus segmenter to %s", path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NucleusSegmenter:
        """Load a segmenter saved with :meth:`save`.

        Raises
        ------
        FileNotFoundError
            ``path`` is not a folder.
        ValueError
            The folder was not written by :meth:`save` (e.g. a StarDist, Cellpose or ghist expression model
            folder), its settings are unreadable, or its weights do not fit the network its settings describe.

        Examples
        --------
        >>> seg = ghist.pp.NucleusSegmenter.load("my_segmenter")  # doctest: +SKIP

        """
        from .._model._safe_load import safe_torch_load

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Nucleus segmenter folder {str(path)!r} not found (or not a folder).")
        settings = _read_settings(path)
        arch = {k: settings[k] for k in ("pixel_size", "widths", "unshuffle")}
        post = {k: settings[k] for k in (*POSTPROCESS_KEYS, "min_area_um2", "max_area_um2") if k in settings}
        try:
            # absent in folders saved before ghist normalised stains: such a model segments images as they are
            reference = settings.get("stain_reference")
            reference = None if reference is None else StainStatistics.from_json(reference)
            model = cls(**arch, **post, stain_reference=reference, training=settings.get("training"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"Nucleus segmenter folder {str(path)!r} has invalid settings: {err}") from err
        expected = f"the weights of a ghist nucleus segmenter (a dict of tensors, as {cls.__name__}.save writes)"
        tensors = safe_torch_load(path / WEIGHTS_FILE, what="Nucleus segmenter weights", expected=expected)
        if not isinstance(tensors, dict):
            raise ValueError(f"{str(path / WEIGHTS_FILE)!r} holds a {type(tensors).__name__}; expected {expected}.")
        try:
            model.net.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"The weights in {str(path / WEIGHTS_FILE)!r} do not fit the network of {SETTINGS_FILE} ({first})."
            ) from err
        model.net.eval()
        return model

    def __repr__(self) -> str:
        steps = self.training.get("steps")
        trained = f", trained {steps} steps" if steps is not None else ", untrained"
        return (
            f"NucleusSegmenter(pixel_size={self.pixel_size:g} µm, widths={self.net.widths}, "
            f"unshuffle={self.net.unshuffle}{trained})"
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------------------------------------

    def margin_px(self, pixel_size: float) -> float:
        """Context (pixels at ``pixel_size``) a window needs around a nucleus for the network to see it whole."""
        return self.net.receptive_radius() * self.pixel_size / pixel_size

    def _fused(self) -> Any:
        """An inference copy of the network with batch norms folded in (rebuilt after weights change)."""
        import copy

        from .._model._nucleus_net import fuse_batchnorm

        key = id(self.net), sum(float(p.detach().sum()) for p in self.net.parameters())
        if self._inference_net is None or self._inference_net[0] != key:
            self._inference_net = (key, fuse_batchnorm(copy.deepcopy(self.net).cpu()))
        return self._inference_net[1]

    def predict_maps(self, rgb: np.ndarray) -> np.ndarray:
        """``(2, H, W)`` float32 foreground probability and relative distance of a ``(H, W, 3)`` uint8 window.

        The window is taken to be at the working pixel size already. It is mirrored out to a size the network
        accepts and cut back. Calls are serialised (one network, all cores per call).
        """
        import torch

        from .._model._nucleus_net import standardise

        h, w = rgb.shape[:2]
        m = self.net.multiple
        ph, pw = (-h) % m + (m if h < m else 0), (-w) % m + (m if w < m else 0)
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
        x = standardise(x)
        if ph or pw:
            mode = "reflect" if h > ph and w > pw else "replicate"
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
        with self._lock, torch.inference_mode():
            net = self._fused()
            out = torch.sigmoid(net(x.contiguous(memory_format=torch.channels_last)))
        return out[0, :, :h, :w].float().numpy()

    def segment(
        self, rgb: np.ndarray, pixel_size: float, stain_map: StainMap | None = None, **postprocess: float
    ) -> np.ndarray:
        """Instance labels (``int32``) of a ``(H, W, 3)`` uint8 window whose pixels are ``pixel_size`` µm.

        ``stain_map``: the map from the colours of the image the window comes from to those of the training images
        (:class:`~ghist.pp._stain_norm.StainMap` to :attr:`stain_reference`), applied on the working grid first.

        The window is resampled to the working pixel size, where the maps are predicted and turned into instances
        (the watershed costs what the network does: both run on the working grid). Back on the window's grid,
        each pixel takes the label of the working pixel it falls in, where the foreground probability,
        interpolated bilinearly, is above the threshold: outlines follow the smooth map, not the working pixels.
        """
        unknown = sorted(set(postprocess) - set(POSTPROCESS_KEYS))
        if unknown:
            raise TypeError(
                f"Unknown option(s) {unknown} for method='ghist'; expected some of {list(POSTPROCESS_KEYS)}."
            )
        opts = {**{k: getattr(self, k) for k in POSTPROCESS_KEYS}, **postprocess}
        h, w = rgb.shape[:2]
        working = resample_rgb(rgb, pixel_size / self.pixel_size)
        if stain_map is not None:
            working = stain_map(working)
        maps = self.predict_maps(working)
        labels = instances_from_maps(
            maps,
            fg_threshold=float(opts["fg_threshold"]),
            marker_threshold=float(opts["marker_threshold"]),
            min_marker_px=float(opts["min_marker_um2"]) / self.pixel_size**2,
            marker_prominence=float(opts["marker_prominence"]),
        )
        if labels.shape != (h, w):
            labels = _labels_on_grid(labels, maps[0], (h, w), float(opts["fg_threshold"]))
        return labels


# ----------------------------------------------------------------------------------------------------------------------
# Post-processing and resampling
# ----------------------------------------------------------------------------------------------------------------------


def instances_from_maps(
    maps: np.ndarray,
    *,
    fg_threshold: float,
    marker_threshold: float,
    min_marker_px: float = 0.0,
    marker_prominence: float = 0.0,
) -> np.ndarray:
    """Instance labels (``int32``) from ``(2, H, W)`` foreground probability and relative distance maps.

    Nuclei are the foreground (probability above ``fg_threshold``) flooded from seeds along the distance map,
    smoothed by :data:`DISTANCE_SMOOTHING` first. Seeds are the regions where that distance is above
    ``marker_threshold`` (those under ``min_marker_px`` pixels dropped), each split into its peaks that rise at
    least ``marker_prominence`` above the saddle to a higher peak (:class:`NucleusSegmenter`).

    Examples
    --------
    >>> maps = np.zeros((2, 8, 8), np.float32)
    >>> maps[:, 2:6, 2:6] = 1.0
    >>> int(instances_from_maps(maps, fg_threshold=0.5, marker_threshold=0.5).max())
    1

    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    mask = maps[0] > fg_threshold
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    dist = ndi.gaussian_filter(np.asarray(maps[1], dtype=np.float32), DISTANCE_SMOOTHING)
    markers, n = ndi.label(mask & (dist > marker_threshold))
    if n and min_marker_px > 1:
        size = np.bincount(markers.ravel(), minlength=n + 1)
        small = size < min_marker_px
        small[0] = False
        if small.any():
            keep = np.cumsum(~small) * ~small
            keep[0] = 0
            markers = keep[markers]
            n = int(keep.max())
    if n and marker_prominence > 0:
        markers, n = _split_at_peaks(markers, n, dist, marker_threshold, marker_prominence)
    labels = watershed(-dist, markers, mask=mask) if n else np.zeros(mask.shape, dtype=np.int32)
    # Foreground pieces no seed reached become objects of their own (the area filter may drop them later).
    rest, n_rest = ndi.label(mask & (labels == 0))
    if n_rest:
        labels = np.where(rest > 0, rest + n, labels)
    return labels.astype(np.int32, copy=False)


def _split_at_peaks(
    markers: np.ndarray, n: int, dist: np.ndarray, floor: float, prominence: float
) -> tuple[np.ndarray, int]:
    """``markers`` (ids ``1..n``) with each region holding several prominent peaks of ``dist`` split into them.

    A peak (a plateau of 3 x 3 local maxima) is prominent when no higher point of its region can be reached from it
    without going more than ``prominence`` below it (its dynamic, in the language of morphology); the highest peak
    of a region always is. Peaks are taken highest first, and one that reaches a peak already kept joins it; ties go
    to the first. A peak lower than ``floor + prominence`` can only reach the others, so regions with fewer than two
    peaks above that are left whole without a search: most regions are single nuclei.
    """
    from scipy import ndimage as ndi

    eight, four = np.ones((3, 3), dtype=bool), ndi.generate_binary_structure(2, 1)  # passed: built once, not per call
    tops = (dist == ndi.maximum_filter(dist, size=3)) & (markers > 0)
    top_ids, _ = ndi.label(tops, structure=eight)
    pixels = np.flatnonzero(tops)
    ids, first = np.unique(top_ids.ravel()[pixels], return_index=True)
    at = np.unravel_index(pixels[first], dist.shape)  # one pixel of each peak
    region, height = markers[at].astype(np.int64), dist[at]
    tall = height >= floor + prominence
    searched = np.flatnonzero(np.bincount(region[tall], minlength=n + 1) > 1)
    if searched.size == 0:
        return markers, n
    boxes = ndi.find_objects(markers)
    order = np.lexsort((-height, region))  # by region, highest peak first
    starts = np.searchsorted(region[order], searched)
    next_id = n + 1
    split: list[int] = []
    for r, start in zip(searched, starts):
        box = boxes[r - 1]
        inside = markers[box] == r
        sub = dist[box]
        kept: list[tuple[int, int, int]] = []  # (peak id, row, col) in the box
        for k in order[start:]:
            if region[k] != r or (height[k] < floor + prominence and kept):
                break
            y, x = at[0][k] - box[0].start, at[1][k] - box[1].start
            if kept:
                reach, _ = ndi.label(inside & (sub > height[k] - prominence), structure=four)
                if reach[y, x] in {reach[ky, kx] for _, ky, kx in kept}:
                    continue
            kept.append((int(ids[k]), y, x))
        if len(kept) > 1:
            window = markers[box]  # a view: written through to ``markers``
            window[inside] = 0
            peaks = np.where(inside, top_ids[box], 0)  # a plateau may touch a diagonal neighbour region
            for peak, *_ in kept:
                window[peaks == peak] = next_id
                next_id += 1
            split.append(int(r))
    if not split:
        return markers, n
    present = np.ones(next_id, dtype=np.int64)
    present[[0, *split]] = 0
    return (np.cumsum(present) * present)[markers], next_id - 1 - len(split)  # ids 1..n again, no gaps


def resample_rgb(rgb: np.ndarray, scale: float) -> np.ndarray:
    """``(H, W, 3)`` uint8 resampled by ``scale`` (working pixels per window pixel), by ghist's one rule.

    Unchanged within 5% of 1 (:func:`ghist._spatial.working_scale`), means of whole ``k x k`` blocks for a
    factor ``1 / k``, otherwise antialiased bilinear interpolation.
    """
    import torch

    from .._spatial import working_scale

    scale = working_scale(1.0, 1.0 / scale)
    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    k = round(1 / scale)
    if scale < 1 and abs(k * scale - 1) < 1e-9:
        out = torch.nn.functional.avg_pool2d(x, k, ceil_mode=True)
    else:
        out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _labels_on_grid(labels: np.ndarray, fg: np.ndarray, size: tuple[int, int], fg_threshold: float) -> np.ndarray:
    """Working-grid ``labels`` on a ``size`` grid over the same area: nearest label, inside the smooth foreground."""
    import torch

    h, w = size
    rows = np.minimum(((np.arange(h) + 0.5) * labels.shape[0] / h).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * labels.shape[1] / w).astype(np.int64), labels.shape[1] - 1)
    nearest = labels[np.ix_(rows, cols)]
    x = torch.from_numpy(np.ascontiguousarray(fg, dtype=np.float32))[None, None]
    smooth = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    return np.where(smooth > fg_threshold, nearest, 0).astype(np.int32, copy=False)


# ----------------------------------------------------------------------------------------------------------------------
# Files and the `model=` argument
# ----------------------------------------------------------------------------------------------------------------------


def _unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not 0 < value < 1:
        raise ValueError(f"`{name}` must be a number in (0, 1), got {value!r}.")
    return float(value)


def is_segmenter_folder(path: Path) -> bool:
    """Whether ``path`` holds a ``segmenter.json`` naming ghist's nucleus segmenter format."""
    try:
        return json.loads((Path(path) / SETTINGS_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _foreign_kind(path: Path) -> str:
    """A guess of what tool wrote a folder that is not a ghist segmenter, for the error message."""
    names = {p.name for p in path.iterdir()}
    if "model.json" in names or "model.pt" in names:
        return " (it looks like a ghist expression model, for `ghist.tl.predict`)"
    if "config.json" in names and any(n.endswith((".h5", ".hdf5")) for n in names):
        return " (it looks like a StarDist model: use method='stardist')"
    if any("cellpose" in n.lower() for n in names):
        return " (it looks like Cellpose weights: use method='cellpose')"
    return ""


def _read_settings(path: Path) -> dict[str, Any]:
    file = path / SETTINGS_FILE
    if not file.is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        raise ValueError(
            f"{str(path)!r} is not a ghist nucleus segmenter folder{_foreign_kind(path)}: it has no {SETTINGS_FILE} "
            f"(it holds {found}). Expected a folder written by `NucleusSegmenter.save` "
            "(`ghist.pp.fit_segmenter(...).save(path)`)."
        )
    try:
        settings = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(file)!r} is not readable JSON ({err}).") from err
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        got = settings.get("format") if isinstance(settings, dict) else type(settings).__name__
        raise ValueError(
            f"{str(file)!r} does not describe a ghist nucleus segmenter (format {got!r}, expected {FORMAT!r})."
        )
    if int(settings.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} was saved in segmenter format {settings['format_version']}, newer than this ghist reads "
            f"({FORMAT_VERSION}); upgrade ghist."
        )
    missing = [k for k in ("pixel_size", "widths", "unshuffle") if k not in settings]
    if missing:
        raise ValueError(f"{str(file)!r} lacks the setting(s) {missing}.")
    if not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"Nucleus segmenter folder {str(path)!r} has no {WEIGHTS_FILE}.")
    return settings


def resolve_segmenter(model: Any) -> NucleusSegmenter:
    """What ``segment_nuclei(method="ghist", model=...)`` accepts: a segmenter, a saved folder, a bundled name."""
    if isinstance(model, NucleusSegmenter):
        return model
    if model is None:
        raise ValueError(
            "method='ghist' needs `model=`: a `ghist.pp.NucleusSegmenter` (from `ghist.pp.fit_segmenter`), the "
            "folder it was saved to, or the name of a bundled segmenter "
            f"({sorted(BUNDLED_SEGMENTERS) or 'none ship with this version'})."
        )
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.is_dir():
            return NucleusSegmenter.load(path)
        if isinstance(model, str) and model in BUNDLED_SEGMENTERS:
            return NucleusSegmenter.load(BUNDLED_SEGMENTERS[model])
        raise ValueError(
            f"`model={str(model)!r}` is neither a folder nor a bundled nucleus segmenter "
            f"({sorted(BUNDLED_SEGMENTERS) or 'none ship with this version'}); train one with "
            "`ghist.pp.fit_segmenter` and pass it or the folder it was saved to."
        )
    raise TypeError(
        "`model` for method='ghist' must be a NucleusSegmenter, a folder or a bundled name; got "
        f"{type(model).__name__}."
    )


def receptive_margin(model: NucleusSegmenter, pixel_size: float) -> float:
    """Halo pixels the model needs at ``pixel_size`` (rounded up)."""
    return float(math.ceil(model.margin_px(pixel_size)))
