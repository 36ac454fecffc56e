"""Nucleus segmentation (``ghist.pp.segment_nuclei``, watershed) of the HER2ST H&E sections.

Example::

    python benchmarks/segment_her2st.py --sections B4 C2 C3 C4 --chunk-size 2048 --n-workers 2

For each section (about 9270 x 9920 px at 0.688 µm/px) prints the nucleus count, the density per mm² of tissue
of the nuclei centred in tissue (tissue: pixels darker than Otsu's threshold of the grey level of an 8x downsampled
copy, closed and hole-filled), the nucleus area distribution (median and interquartile range, µm²) and the run
time of the segmentation alone, then LAST a summary line. Saves a crop of section ``--overlay-section`` with the
label outlines (left: H&E, right: outlines) to ``--overlay``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import spatialdata as sd
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import find_boundaries
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale

import ghist

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"
PIXEL_SIZE = 0.688  # µm per pixel of the full-resolution HER2ST images
TISSUE_STEP = 8  # downsampling of the tissue mask


def load_section(path: Path) -> sd.SpatialData:
    Image.MAX_IMAGE_PIXELS = None
    rgb = np.asarray(Image.open(path).convert("RGB"))
    image = Image2DModel.parse(
        np.moveaxis(rgb, -1, 0),
        dims=("c", "y", "x"),
        chunks=(3, 2048, 2048),
        transformations={"global": Identity(), "microns": Scale([PIXEL_SIZE, PIXEL_SIZE], axes=("y", "x"))},
    )
    return sd.SpatialData(images={"he": image})


def tissue_mask(rgb: np.ndarray, step: int = TISSUE_STEP) -> np.ndarray:
    """Tissue (not glass) on a ``step``-times downsampled copy of a ``(y, x, 3)`` image.

    Pixels darker than Otsu's threshold of the smoothed grey level, closed over about 80 µm, enclosed holes filled,
    pieces under 0.05 mm² dropped.
    """
    gray = ndi.gaussian_filter(rgb[::step, ::step].astype(np.float32).mean(-1), 2)
    mask = gray < threshold_otsu(gray)
    size = max(3, round(80 / (step * PIXEL_SIZE)))
    mask = ndi.binary_closing(mask, structure=np.ones((size, size)), border_value=0)
    mask = ndi.binary_fill_holes(mask)
    parts, n = ndi.label(mask)
    if n:
        keep = np.bincount(parts.ravel()) * (step * PIXEL_SIZE) ** 2 >= 0.05e6
        keep[0] = False
        mask = keep[parts]
    return mask


def overlay(rgb: np.ndarray, labels: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    crop = rgb[y : y + size, x : x + size]
    lab = labels[y : y + size, x : x + size]
    outlined = crop.copy()
    outlined[find_boundaries(lab, mode="inner")] = (0, 255, 0)
    return np.concatenate([crop, outlined], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4"])
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--n-workers", type=int, default=None, help="threads (default: the CPUs available, at most 8)")
    parser.add_argument("--overlay-section", default="C4")
    parser.add_argument("--overlay-yx", type=int, nargs=2, default=[4000, 4000], help="top-left corner of the crop")
    parser.add_argument("--overlay-size", type=int, default=600)
    parser.add_argument("--overlay", type=Path, default=ROOT / "docs" / "_static" / "segmentation_her2st_c4.png")
    args = parser.parse_args()
    logging.getLogger("ghist").setLevel(logging.WARNING)

    totals = []
    for section in args.sections:
        sdata = load_section(DATA / section / "he.jpg")
        start = time.perf_counter()
        ghist.pp.segment_nuclei(sdata, chunk_size=args.chunk_size, num_workers=args.n_workers, progress=False)
        seconds = time.perf_counter() - start

        rgb = np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)
        labels = np.asarray(sdata.labels["nuclei"].data.compute())
        flat = labels.ravel()
        area_px = np.bincount(flat)
        present = np.flatnonzero(area_px[1:]) + 1
        area_um2 = area_px[present] * PIXEL_SIZE**2
        rows, cols = np.divmod(np.arange(flat.size), labels.shape[1])
        cy = np.bincount(flat, weights=rows)[present] / area_px[present]
        cx = np.bincount(flat, weights=cols)[present] / area_px[present]
        del rows, cols
        mask = tissue_mask(rgb)
        tissue_mm2 = mask.sum() * (TISSUE_STEP * PIXEL_SIZE) ** 2 * 1e-6
        my = np.minimum((cy // TISSUE_STEP).astype(int), mask.shape[0] - 1)
        mx = np.minimum((cx // TISSUE_STEP).astype(int), mask.shape[1] - 1)
        n_tissue = int(mask[my, mx].sum())
        q1, median, q3 = np.percentile(area_um2, [25, 50, 75])
        n = area_um2.size
        print(
            f"section={section} shape={labels.shape} nuclei={n} in_tissue={n_tissue} tissue_mm2={tissue_mm2:.2f} "
            f"density_per_mm2={n_tissue / tissue_mm2:.0f} area_median_um2={median:.1f} "
            f"area_iqr_um2={q1:.1f}-{q3:.1f} seconds={seconds:.1f} megapixels_per_s={labels.size / seconds / 1e6:.2f}",
            flush=True,
        )
        totals.append((n, n_tissue, tissue_mm2, seconds, labels.size))
        if section == args.overlay_section:
            y, x = args.overlay_yx
            args.overlay.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(overlay(rgb, labels, y, x, args.overlay_size)).save(args.overlay, optimize=True)
            print(f"overlay={args.overlay}")
        del sdata, rgb, labels

    n, n_tissue, tissue, seconds, pixels = (sum(t[i] for t in totals) for i in range(5))
    print(
        f"sections={len(totals)} nuclei={n} density_per_mm2={n_tissue / tissue:.0f} seconds={seconds:.1f} "
        f"seconds_per_section={seconds / len(totals):.1f} megapixels_per_s={pixels / seconds / 1e6:.2f}"
    )


if __name__ == "__main__":
    main()
