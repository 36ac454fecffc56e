"""A learned nucleus segmenter on H&E it was not trained on: HER2ST breast sections, against the watershed.

No nucleus annotations exist for these sections, so nothing is scored: the script segments the central
1,024 x 1,024 crop of each section (0.688 µm/px) three ways — the watershed (``segment_nuclei``'s default), the
learned segmenter on the image's own colours (``normalise_stain=False``) and the learned segmenter with its default
stain normalisation — prints the nuclei found, their median area and the fraction of pixels inside a nucleus, and
writes a figure of the outlines (a 384-px window of each crop; columns in that order) to look at.

    python benchmarks/segmentation_her2st.py --model /tmp/segmenter --out her2st_nuclei.jpg
    python benchmarks/segmentation_her2st.py --model /tmp/segmenter --sections B4 C2 C3 C4

``--model``: a folder saved by ``fit_segmenter`` (e.g. ``benchmarks/segmentation_real.py --save-model``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from segmentation_real import to_sdata
from skimage.segmentation import find_boundaries

import ghist

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
PIXEL_SIZE = 0.688
CROP, VIEW = 1024, 384
RUNS = {
    "watershed": {},
    "learned, own colours": {"method": "ghist", "normalise_stain": False},
    "learned, normalised": {"method": "ghist"},
}


def central_crop(section: str) -> np.ndarray:
    Image.MAX_IMAGE_PIXELS = None
    rgb = np.asarray(Image.open(DATA / section / "he.jpg").convert("RGB"))
    y, x = rgb.shape[0] // 2 - CROP // 2, rgb.shape[1] // 2 - CROP // 2
    return rgb[y : y + CROP, x : x + CROP]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder of a saved nucleus segmenter")
    parser.add_argument("--sections", nargs="+", default=["B4", "C2", "C3"])
    parser.add_argument("--out", default=None, help="image file of the outlines, .png or .jpg (default: none)")
    args = parser.parse_args()

    rows = []
    for section in args.sections:
        crop = central_crop(section)
        sdata = to_sdata(crop, None, pixel_size=PIXEL_SIZE)
        panels = []
        for i, (name, kwargs) in enumerate(RUNS.items()):
            model = args.model if kwargs.get("method") == "ghist" else None
            ghist.pp.segment_nuclei(sdata, key_added=f"run{i}", model=model, progress=False, **kwargs)
            labels = np.asarray(sdata.labels[f"run{i}"].data.compute())
            areas = np.bincount(labels.ravel())[1:]
            areas = areas[areas > 0] * PIXEL_SIZE**2
            print(
                f"{section} {name:22s} nuclei={areas.size:5d} median_area_um2={np.median(areas):5.1f} "
                f"nucleus_fraction={(labels > 0).mean():.3f}",
                flush=True,
            )
            window = (slice(CROP // 2 - VIEW // 2, CROP // 2 + VIEW // 2),) * 2
            panel = crop[window].copy()
            panel[find_boundaries(labels[window])] = (0, 255, 0)
            panels.append(panel)
        rows.append(np.concatenate(panels, axis=1))
    if args.out:
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.out, optimize=True)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
