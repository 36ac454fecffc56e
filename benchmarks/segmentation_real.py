"""Nucleus segmentation on real annotated H&E: the watershed and a learned segmenter, scored on held-out images.

Example::

    python benchmarks/segmentation_real.py --max-time 00:30:00 --save-model /tmp/segmenter

Data: ``../shared/data/nuclei_dev`` (CoNSeP training images, 40x colorectal H&E, 0.25 µm/px). Each of its 27 images
was cut into 16 patches of 256 px: a 3 x 3 grid from the top-left corner plus a row and a column of patches flush
with the bottom and right edges of the 1000 x 1000 image, labels keeping the image's own nucleus ids. So the
patches are put back together into one 1000 x 1000 SpatialData per image (checked: overlapping patches agree).

A fixed split by image (printed) holds out whole images: the learned segmenter is trained with
``ghist.pp.fit_segmenter(train, image_key="he", labels_key="nuclei", max_time=..., seed=...)`` on the others, saved,
and used from its folder through ``ghist.pp.segment_nuclei(sdata, method="ghist", model=<folder>, pixel_size=0.25)``,
as is the watershed (``method="watershed"``). Both are scored with ``ghist.tl.evaluate_segmentation`` (IoU > 0.5
matching; PQ, F1, SQ, AJI), per image and pooled over the held-out images. Throughput is timed on a mosaic of the
held-out images (``--mosaic`` x ``--mosaic`` of them, 6 x 6 = 36 Mpx by default, one lazy dask image stored in
2048 px chunks, segmented with the default blocks and workers of ``segment_nuclei``), in Mpx/s of the input
(0.25 µm/px) and of the learned model's working pixel size. The CoNSeP terms do not allow shipping weights
trained on it: a saved model is for measuring only.
Quote the output with the machine's ``uptime`` load (printed).
"""

from __future__ import annotations

import os

# On a machine shared with other jobs, OpenMP threads that spin while waiting for each other slow torch's CPU kernels
# many times over (on 2 cores under load 25: 19 s per training step against 1.1 s when they sleep). Set before torch
# is loaded; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import spatialdata as sd
from PIL import Image
from spatialdata.models import Image2DModel, Labels2DModel
from spatialdata.transformations import Identity, Scale

import ghist

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuclei_dev"
PIXEL_SIZE = 0.25
SIDE, PATCH = 1000, 256
#: Held-out images: a fixed spread over the 27 image ids (sparse, dense and mixed fields among them).
HELD_OUT = (2, 6, 10, 14, 18, 22, 26)


def patch_origin(index: int) -> tuple[int, int]:
    """Top-left pixel of patch ``index`` (0-15) in its image (see the module docstring)."""
    last = SIDE - PATCH
    if index < 9:
        return PATCH * (index // 3), PATCH * (index % 3)
    if index < 12:
        return last, PATCH * (index - 9)
    if index < 15:
        return PATCH * (index - 12), last
    return last, last


def read_images(data: Path = DATA) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Image id -> (RGB ``(1000, 1000, 3)`` uint8, labels ``(1000, 1000)`` int32), stitched from the patches."""
    archive = np.load(data / "labels.npz")
    names, labels = [str(n) for n in archive["names"]], archive["labels"]
    images: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for name, lab in zip(names, labels):
        image_id, index = (int(v) for v in re.fullmatch(r"train_(\d+)_(\d+)", name).groups())
        rgb, full = images.setdefault(
            image_id, (np.zeros((SIDE, SIDE, 3), np.uint8), np.full((SIDE, SIDE), -1, np.int32))
        )
        y0, x0 = patch_origin(index)
        window = full[y0 : y0 + PATCH, x0 : x0 + PATCH]
        seen = window >= 0
        if np.any(window[seen] != lab[seen]):
            raise ValueError(f"Patch {name} disagrees with its neighbours' labels where they overlap.")
        window[...] = lab
        rgb[y0 : y0 + PATCH, x0 : x0 + PATCH] = np.asarray(Image.open(data / "images" / f"{name}.jpg").convert("RGB"))
    for image_id, (_, full) in images.items():
        if (full < 0).any():
            raise ValueError(f"Image {image_id}'s patches do not cover it.")
    return images


def to_sdata(
    rgb: np.ndarray, labels: np.ndarray | None, chunks: int | None = None, pixel_size: float = PIXEL_SIZE
) -> sd.SpatialData:
    """An H&E SpatialData (``"he"``, and ``"nuclei"`` labels if given) of ``pixel_size`` µm per pixel."""
    transformations = {"global": Identity(), "microns": Scale([pixel_size, pixel_size], axes=("y", "x"))}
    image = np.moveaxis(rgb, -1, 0)
    kwargs = {"chunks": (3, chunks, chunks)} if chunks else {}
    elements = {
        "images": {"he": Image2DModel.parse(image, dims=("c", "y", "x"), transformations=transformations, **kwargs)}
    }
    if labels is not None:
        elements["labels"] = {
            "nuclei": Labels2DModel.parse(labels, dims=("y", "x"), transformations=dict(transformations))
        }
    return sd.SpatialData(**elements)


def segment(sdata: sd.SpatialData, key: str, **kwargs) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of this process) of one ``segment_nuclei`` call."""
    start, cpu = time.perf_counter(), time.process_time()
    ghist.pp.segment_nuclei(sdata, key_added=key, pixel_size=PIXEL_SIZE, progress=False, **kwargs)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-time", default="00:30:00", help="training budget, HH:MM:SS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-model", default=None, help="folder to save the trained segmenter to (replaced)")
    parser.add_argument("--load-model", default=None, help="skip training: score this saved segmenter")
    parser.add_argument("--mosaic", type=int, default=6, help="side of the held-out mosaic timed, in images")
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("ghist").setLevel(logging.INFO)

    images = read_images(Path(args.data))
    held_out = [i for i in sorted(images) if i in HELD_OUT]
    train = [i for i in sorted(images) if i not in HELD_OUT]
    print(
        f"load at start: {os.getloadavg()}; torch threads: {__import__('torch').get_num_threads()}; "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(f"train images ({len(train)}): {train}")
    print(f"held-out images ({len(held_out)}): {held_out}")

    tmp = tempfile.TemporaryDirectory(prefix="ghist-segmentation-real-")
    folder = args.load_model
    if folder is None:
        start = time.perf_counter()
        model = ghist.pp.fit_segmenter(
            [to_sdata(*images[i]) for i in train],
            image_key="he",
            labels_key="nuclei",
            max_time=args.max_time,
            seed=args.seed,
        )
        print(f"trained in {time.perf_counter() - start:.0f} s: {model}")
        val = model.training["val_scores"]
        print(
            f"validation part (last rows of the training images): PQ {val['pq']:.3f} F1 {val['f1']:.3f} at "
            f"fg_threshold={model.fg_threshold} marker_threshold={model.marker_threshold}"
        )
        folder = args.save_model or str(Path(tmp.name) / "segmenter")
        model.save(folder, overwrite=args.save_model is not None)
    working = ghist.pp.NucleusSegmenter.load(folder).pixel_size

    tests = {i: to_sdata(*images[i]) for i in held_out}
    for sdata in tests.values():
        segment(sdata, "watershed", method="watershed")
        segment(sdata, "learned", method="ghist", model=folder)
    names = [str(i) for i in held_out]
    tables = {
        key: ghist.tl.evaluate_segmentation(list(tests.values()), labels_key=key, true_key="nuclei", names=names)
        for key in ("watershed", "learned")
    }
    columns = ["pq", "f1", "sq", "aji", "dice", "n_true", "n_pred", "n_matched"]
    for key, table in tables.items():
        print(f"\n{key} on held-out images (per image, then pooled):")
        print(table[columns].round(3).to_string())

    # Throughput on a mosaic of held-out images, as a slide would be read: lazily, chunk by chunk.
    n = args.mosaic
    tiles = [images[held_out[k % len(held_out)]][0] for k in range(n * n)]
    mosaic = np.concatenate([np.concatenate(tiles[r * n : (r + 1) * n], axis=1) for r in range(n)], axis=0)
    slide = to_sdata(mosaic, None, chunks=2048)
    mpx = mosaic.shape[0] * mosaic.shape[1] / 1e6
    mpx_working = mpx * (PIXEL_SIZE / working) ** 2
    print(
        f"\nthroughput on a {mosaic.shape[0]} x {mosaic.shape[1]} mosaic ({mpx:.1f} Mpx at {PIXEL_SIZE} µm/px), "
        f"load {os.getloadavg()}:"
    )
    n_cpus = len(os.sched_getaffinity(0))
    print(
        f"  (CPU-bound rate: the Mpx per CPU-second of this process times its {n_cpus} CPUs, what the wall rate "
        "would be on an otherwise idle machine if every CPU were kept busy)"
    )
    for key, kwargs in (("watershed", {"method": "watershed"}), ("learned", {"method": "ghist", "model": folder})):
        seconds, cpu = segment(slide, key, **kwargs)
        line = (
            f"  {key}: {seconds:.1f} s wall, {cpu:.1f} CPU-s; at the input's {PIXEL_SIZE} µm/px {mpx / seconds:.2f} "
            f"Mpx/s wall, {mpx * n_cpus / cpu:.2f} CPU-bound"
        )
        if key == "learned":
            line += (
                f"; at its working {working} µm/px {mpx_working / seconds:.2f} Mpx/s wall, "
                f"{mpx_working * n_cpus / cpu:.2f} CPU-bound"
            )
        print(line)
    pooled = {key: table.loc["pooled"] for key, table in tables.items()}
    print(
        f"\nSUMMARY pooled held-out PQ/F1/SQ/AJI: watershed {pooled['watershed']['pq']:.3f}/"
        f"{pooled['watershed']['f1']:.3f}/{pooled['watershed']['sq']:.3f}/{pooled['watershed']['aji']:.3f}, learned "
        f"{pooled['learned']['pq']:.3f}/{pooled['learned']['f1']:.3f}/{pooled['learned']['sq']:.3f}/"
        f"{pooled['learned']['aji']:.3f}; load at end {os.getloadavg()}"
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
