"""Slide-file backends of :func:`ghist.io.read_wsi`: which library opens a file, and its levels as guarded arrays.

tiffslide (TIFF family, read lazily through its zarr view) and OpenSlide (``openslide-python`` with the
``openslide-bin`` library: MRXS, VMS/VMU, SCN, BIF, DICOM, ...) do the decoding. What ghist adds on top: one choice
of backend by file type, the same level/pixel-size rules whichever backend read the file, a tifffile fallback for
planar (one plane per colour) TIFFs that tiffslide refuses, and chunk reads that turn a decode failure (truncated or
corrupt file) into a :class:`SlideReadError` naming the file, the level and the tile.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "tiffslide", "openslide", "bioformats")
OPENSLIDE_EXTRA = 'pip install "ghist[openslide]"  (openslide-python and openslide-bin)'

# Formats only OpenSlide reads (not TIFF, or TIFF with a layout tiffslide does not assemble).
OPENSLIDE_ONLY = {
    ".mrxs": "3DHistech MIRAX",
    ".vms": "Hamamatsu VMS",
    ".vmu": "Hamamatsu VMU",
    ".svslide": "Sakura SVSlide",
    ".dcm": "DICOM WSI",
}
# TIFF-based vendor formats that tiffslide opens but OpenSlide assembles as the vendor meant (Leica's several
# images of one slide, Ventana's overlapping tiles): OpenSlide when installed, tiffslide otherwise.
OPENSLIDE_PREFERRED = {".scn": "Leica SCN", ".bif": "Ventana BIF"}
# Formats that need Bio-Formats (a Java library).
BIOFORMATS_ONLY = {
    ".czi": "Zeiss CZI",
    ".lif": "Leica LIF",
    ".nd2": "Nikon ND2",
    ".vsi": "Olympus VSI",
    ".zvi": "Zeiss ZVI",
    ".isyntax": "Philips iSyntax",
}
BIOFORMATS_HINT = (
    "ghist has no Bio-Formats reader: Bio-Formats is a Java library, and its Python bindings need a Java runtime "
    "and download the reader at first use. Convert the slide to a pyramidal OME-TIFF with Bio-Formats' command-line "
    "tools (e.g. `bfconvert -pyramid-resolutions 6 -pyramid-scale 2 -tilex 512 -tiley 512 -compression JPEG "
    "slide.czi slide.ome.tif`; iSyntax: Philips' isyntax-to-tiff converter) and read the OME-TIFF."
)


class SlideReadError(ValueError):
    """A slide file could not be decoded: the message names the file, the pyramid level and the tile."""


def openslide_available() -> bool:
    """Whether ``openslide-python`` and its library (``openslide-bin`` or a system OpenSlide) can be imported."""
    if importlib.util.find_spec("openslide") is None:
        return False
    try:
        import openslide  # noqa: F401  (loads the C library)
    except (ImportError, OSError):
        return False
    return True


@dataclass
class OpenedSlide:
    """One opened slide file: where it came from, its levels (``(h, w, c)`` uint8 array-likes) and its metadata."""

    path: Path
    backend: str
    levels: list[Any]
    downsamples: list[float]
    mpp: tuple[Any, Any] = (None, None)  # (x, y) as the backend reports them (strings, floats or None)
    vendor: str | None = None
    objective_power: Any = None
    read_blocks: list[tuple[int, int]] = field(default_factory=list)  # the file's own tile (h, w) per level


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def choose_backend(path: Path, backend: str) -> str:
    """The backend that opens ``path``: ``backend`` itself, or for ``"auto"`` the one its file type needs."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")
    suffix = _suffix(path)
    if backend == "bioformats" or (backend == "auto" and suffix in BIOFORMATS_ONLY):
        what = BIOFORMATS_ONLY.get(suffix, "this file")
        raise ValueError(f"Cannot read {str(path)!r} ({what}) with backend={backend!r}: {BIOFORMATS_HINT}")
    if backend != "auto":
        if backend == "openslide" and not openslide_available():
            raise ImportError(f"backend='openslide' needs OpenSlide: {OPENSLIDE_EXTRA}.")
        return backend
    if suffix in OPENSLIDE_ONLY:
        if not openslide_available():
            raise ImportError(
                f"{str(path)!r} is a {OPENSLIDE_ONLY[suffix]} slide, which only OpenSlide reads: {OPENSLIDE_EXTRA}."
            )
        return "openslide"
    if suffix in OPENSLIDE_PREFERRED and openslide_available():
        return "openslide"
    return "tiffslide"


def open_slide(path: Path, backend: str) -> OpenedSlide:
    """Open ``path`` with the chosen backend (``"auto"``: by file type, then OpenSlide if tiffslide cannot)."""
    chosen = choose_backend(path, backend)
    if chosen == "openslide":
        return _open_openslide(path)
    try:
        return _open_tiffslide(path)
    except ValueError as err:
        if backend == "auto" and openslide_available():
            try:
                return _open_openslide(path)
            except ValueError:
                pass
        raise err


def _formats() -> str:
    return "Aperio SVS, Hamamatsu NDPI, OME-TIFF, Philips/Leica/Ventana TIFF and generic pyramidal TIFF" + (
        "; with OpenSlide also " + ", ".join(sorted({**OPENSLIDE_ONLY, **OPENSLIDE_PREFERRED}.values()))
    )


def _open_tiffslide(path: Path) -> OpenedSlide:
    import tiffslide

    try:
        slide = tiffslide.TiffSlide(path)
    except Exception as err:  # tifffile raises several types for files that are not TIFF
        raise ValueError(f"Cannot read {str(path)!r} as a slide file ({_formats()}): {err}") from err
    try:
        properties = dict(slide.properties)
    except NotImplementedError:  # e.g. planar configuration (one plane per colour), which tiffslide does not parse
        return _open_tifffile(path, slide.ts_tifffile)
    except Exception as err:
        raise ValueError(f"Cannot read the metadata of {str(path)!r}: {type(err).__name__}: {err}") from err
    try:
        group = slide.zarr_group
    except NotImplementedError:
        return _open_tifffile(path, slide.ts_tifffile)
    except Exception as err:
        raise ValueError(f"Cannot read the levels of {str(path)!r}: {type(err).__name__}: {err}") from err
    n = slide.level_count
    arrays = [group[str(i)] if n > 1 or str(i) in group else group for i in range(n)]
    return OpenedSlide(
        path=path,
        backend="tiffslide",
        levels=[_GuardedLevel(array, path, i, (0, 1, 2)) for i, array in enumerate(arrays)],
        downsamples=[float(d) for d in slide.level_downsamples],
        mpp=(properties.get("tiffslide.mpp-x"), properties.get("tiffslide.mpp-y")),
        vendor=properties.get("tiffslide.vendor"),
        objective_power=properties.get("tiffslide.objective-power"),
        read_blocks=[tuple(int(c) for c in array.chunks[:2]) for array in arrays],
    )


def _open_tifffile(path: Path, tif: Any) -> OpenedSlide:
    """TIFFs that tiffslide does not parse (planar configuration): the first series' levels straight from tifffile."""
    import zarr

    series = tif.series[0]
    axes = series.axes
    if axes not in ("YXS", "SYX", "YX"):
        raise ValueError(
            f"{str(path)!r} stores its image with axes {axes!r} (shape {series.shape}); expected an RGB slide "
            "(Y, X, samples), e.g. written by `vips tiffsave --tile --pyramid` or tifffile."
        )
    levels, blocks = [], []
    for i, level in enumerate(series.levels):
        array = zarr.open(level.aszarr(), mode="r")
        if isinstance(array, zarr.Group):
            array = array["0"]
        order = (1, 2, 0) if axes == "SYX" else (0, 1, 2)
        levels.append(_GuardedLevel(array, path, i, order))
        chunks = array.chunks
        blocks.append((int(chunks[1]), int(chunks[2])) if axes == "SYX" else (int(chunks[0]), int(chunks[1])))
    full = levels[0].shape
    page = series.pages[0] if series.pages else tif.pages[0]
    mpp = _resolution_mpp(page)
    return OpenedSlide(
        path=path,
        backend="tifffile",
        levels=levels,
        downsamples=[full[0] / lv.shape[0] for lv in levels],
        mpp=(mpp, mpp),
        read_blocks=blocks,
    )


def _resolution_mpp(page: Any) -> float | None:
    """µm per pixel from a TIFF page's XResolution/ResolutionUnit (inch or centimetre), else ``None``."""
    try:
        unit = int(page.tags["ResolutionUnit"].value)
        numerator, denominator = page.tags["XResolution"].value
        per_unit = numerator / denominator
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    um = {2: 25400.0, 3: 10000.0}.get(unit)
    return um / per_unit if um and per_unit > 0 else None


def resolution_tags(path: Path) -> str | None:
    """The TIFF resolution tags of the first page as words (``"300 per inch"``), or ``None``."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit = {2: "inch", 3: "cm"}.get(int(tags["ResolutionUnit"].value))
            numerator, denominator = tags["XResolution"].value
    except Exception:  # not a TIFF, or no such tags: nothing to say
        return None
    return None if unit is None or not denominator else f"{numerator / denominator:.6g} per {unit}"


def _open_openslide(path: Path) -> OpenedSlide:
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as err:
        raise ValueError(f"OpenSlide cannot read {str(path)!r} as a slide file: {type(err).__name__}: {err}") from err
    properties = dict(slide.properties)
    levels = [_OpenSlideLevel(path, i, slide) for i in range(slide.level_count)]
    tile = [
        (
            int(properties.get(f"openslide.level[{i}].tile-height", 256)),
            int(properties.get(f"openslide.level[{i}].tile-width", 256)),
        )
        for i in range(slide.level_count)
    ]
    return OpenedSlide(
        path=path,
        backend="openslide",
        levels=levels,
        downsamples=[float(d) for d in slide.level_downsamples],
        mpp=(properties.get("openslide.mpp-x"), properties.get("openslide.mpp-y")),
        vendor=properties.get("openslide.vendor"),
        objective_power=properties.get("openslide.objective-power"),
        read_blocks=tile,
    )


def _describe_box(key: tuple, shape: tuple, block: tuple[int, int] | None) -> str:
    ys, xs = (
        range(*k.indices(n)) if isinstance(k, slice) else range(int(k), int(k) + 1) for k, n in zip(key[:2], shape[:2])
    )
    if not ys or not xs:
        return "an empty window"
    where = f"rows {ys[0]}-{ys[-1]}, columns {xs[0]}-{xs[-1]}"
    if block:
        th, tw = block
        rows = f"{ys[0] // th}" + (f"-{ys[-1] // th}" if ys[-1] // th != ys[0] // th else "")
        cols = f"{xs[0] // tw}" + (f"-{xs[-1] // tw}" if xs[-1] // tw != xs[0] // tw else "")
        where += f" (tile row {rows}, column {cols} of {th}x{tw}-pixel tiles)"
    return where


def _read_error(path: Path, level: int, key: tuple, shape: tuple, block: Any, err: BaseException) -> SlideReadError:
    return SlideReadError(
        f"Cannot decode {str(path)!r}, level {level}, {_describe_box(key, shape, block)}: {type(err).__name__}: "
        f"{err}. The file is truncated or corrupt there; re-export or re-copy the slide."
    )


def _full_key(key: Any, ndim: int) -> tuple:
    key = key if isinstance(key, tuple) else (key,)
    return key + (slice(None),) * (ndim - len(key))


class _GuardedLevel:
    """A zarr level read chunk by chunk, ``(h, w, c)``; a failed decode becomes a :class:`SlideReadError`.

    ``order`` maps the stored axes to ``(y, x, c)`` (``(1, 2, 0)`` for planar ``(c, y, x)`` files).
    """

    def __init__(self, array: Any, path: Path, level: int, order: tuple[int, int, int]) -> None:
        self.array, self.path, self.level, self.order = array, path, level, order
        shape = array.shape if array.ndim == 3 else (*array.shape, 1)
        self.shape = tuple(int(shape[i]) for i in order)
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3
        self.block = None
        chunks = array.chunks if array.ndim == 3 else (*array.chunks, 1)
        self.block = (int(chunks[order[0]]), int(chunks[order[1]]))

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _full_key(key, 3)
        stored = [None, None, None]
        for axis, k in zip(self.order, key):
            stored[axis] = k
        try:
            if self.array.ndim == 2:
                data = np.asarray(self.array[tuple(stored[:2])])[..., None]
            else:
                data = np.asarray(self.array[tuple(stored)])
        except MemoryError:
            raise
        except Exception as err:  # imagecodecs/tifffile raise many types; all mean "this tile did not decode"
            key, err = self._first_bad_tile(key, err)
            raise _read_error(self.path, self.level, key, self.shape, self.block, err) from err
        return data.transpose(self.order)

    def _first_bad_tile(self, key: tuple, err: BaseException) -> tuple[tuple, BaseException]:
        """The first tile of a failed window that fails alone (the error path only), to name it exactly."""
        th, tw = self.block
        ys, xs = (range(*k.indices(n)) for k, n in zip(key[:2], self.shape[:2]) if isinstance(k, slice))
        if ys.step != 1 or xs.step != 1 or len(ys) * len(xs) > 64 * th * tw:
            return key, err
        for y in range(ys[0] // th * th, ys[-1] + 1, th):
            for x in range(xs[0] // tw * tw, xs[-1] + 1, tw):
                tile = (slice(y, min(y + th, self.shape[0])), slice(x, min(x + tw, self.shape[1])), slice(None))
                stored = [tile[self.order.index(axis)] for axis in range(3)]
                try:
                    self.array[tuple(stored[: self.array.ndim])]
                except Exception as tile_err:
                    return tile, tile_err
        return key, err


class _OpenSlideLevel:
    """One OpenSlide level as an ``(h, w, 3)`` uint8 array-like; transparent pixels (no scan data) are white.

    Holds the path rather than the handle across pickling, so dask can ship it to other processes.
    """

    def __init__(self, path: Path, level: int, slide: Any = None) -> None:
        self.path, self.level, self._slide = path, level, slide
        slide = self._handle()
        w, h = slide.level_dimensions[level]
        self.shape = (int(h), int(w), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.downsample = float(slide.level_downsamples[level])
        self.block = None

    def _handle(self) -> Any:
        if self._slide is None:
            import openslide

            self._slide = openslide.OpenSlide(str(self.path))
        return self._slide

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None}

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _full_key(key, 3)
        ys, xs = (
            range(*k.indices(n)) if isinstance(k, slice) else range(int(k), int(k) + 1)
            for k, n in zip(key[:2], self.shape[:2])
        )
        channels = key[2]
        if not ys or not xs:
            return np.zeros((len(ys), len(xs), 3), np.uint8)[..., channels]
        try:
            if (ys.step == 1 and xs.step == 1) or len(ys) * len(xs) * 16 >= (ys[-1] - ys[0] + 1) * (xs[-1] - xs[0] + 1):
                box = self._read(ys[0], xs[0], ys[-1] - ys[0] + 1, xs[-1] - xs[0] + 1)
                data = box[:: ys.step, :: xs.step]
            else:  # sparse strided samples: one small read each (OpenSlide caches the tiles they fall in)
                data = np.stack([np.concatenate([self._read(y, x, 1, 1) for x in xs], axis=1) for y in ys])[:, 0]
        except MemoryError:
            raise
        except Exception as err:  # OpenSlideError and friends
            raise _read_error(self.path, self.level, key, self.shape, self.block, err) from err
        return data[..., channels]

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        # read_region takes the top-left corner in level-0 pixels
        loc = (round(x * self.downsample), round(y * self.downsample))
        rgba = np.asarray(self._handle().read_region(loc, self.level, (int(w), int(h))))
        rgb = rgba[..., :3]
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        # OpenSlide returns un-premultiplied RGBA; areas without scan data are fully transparent: composite on white
        mixed = rgb.astype(np.float32) * (alpha / 255.0) + 255.0 * (1 - alpha / 255.0)
        return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def finite_or_none(value: Any) -> float | None:
    """A metadata value as a finite positive float, or ``None`` (absent, unparseable, zero, negative, inf, NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None
