"""Does a stain normalisation describe the stains or the field? Measured on CoNSeP images from one lab.

The learned segmenter maps every image to its training images' colours. A good map changes an image by its stains,
not by what the field holds: on images of one lab, the nuclei it renders should not get lighter or darker with how
many there are. For each of the 27 CoNSeP images of ``../shared/data/nuclei_dev`` (stitched as in
``segmentation_real.py``) the script maps the image to the pooled statistics of the 20 training images with

- Macenko's stain normalisation (``ghist.pp._stain_norm``, what ``fit_segmenter`` and ``segment_nuclei`` use),
- Reinhard's colour transfer (mean and spread of the tissue pixels' L*, a*, b*; written out here, ghist's earlier
  default),

and prints, with the raw images beside them: the correlation over images between the share of pixels inside a
nucleus and the nuclei's mean L* after mapping, the spread over images of that lightness and of the contrast
between nuclei and the rest of the tissue, and the mean colour change (CIELAB ΔE).

    python benchmarks/stain_normalisation.py
"""

from __future__ import annotations

import numpy as np
from segmentation_real import HELD_OUT, read_images
from skimage.color import lab2rgb, rgb2lab

from ghist.pp._stain_norm import StainMap, StainStatistics

TISSUE_LIGHTNESS = 88.0


def reinhard_statistics(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    lab = rgb2lab(rgb / 255.0).reshape(-1, 3)
    tissue = lab[lab[:, 0] < TISSUE_LIGHTNESS]
    return tissue.mean(axis=0), tissue.std(axis=0), len(tissue)


def reinhard(rgb: np.ndarray, source: tuple, target: tuple) -> np.ndarray:
    lab = (rgb2lab(rgb / 255.0) - source[0]) / source[1] * target[1] + target[0]
    return np.clip(np.rint(lab2rgb(lab) * 255), 0, 255).astype(np.uint8)


def main() -> None:
    images = read_images()
    ids = sorted(images)
    train = [i for i in ids if i not in HELD_OUT]
    macenko = {i: StainStatistics.of(images[i][0]) for i in ids}
    macenko_ref = StainStatistics.pooled([macenko[i] for i in train])
    rein = {i: reinhard_statistics(images[i][0]) for i in ids}
    n = np.array([rein[i][2] for i in train], dtype=float)[:, None]
    mean = (n * [rein[i][0] for i in train]).sum(0) / n.sum()
    second = (n * [rein[i][1] ** 2 + rein[i][0] ** 2 for i in train]).sum(0) / n.sum()
    rein_ref = (mean, np.sqrt(second - mean**2))
    print(f"Macenko reference: {macenko_ref!r}")
    maps = {
        "raw": lambda i, rgb: rgb,
        "Reinhard": lambda i, rgb: reinhard(rgb, rein[i], rein_ref),
        "Macenko": lambda i, rgb: StainMap(macenko[i], macenko_ref)(rgb),
    }
    density, rows = [], {name: [] for name in maps}
    for i in ids:
        rgb, labels = images[i]
        nuclei = labels > 0
        own = rgb2lab(rgb / 255.0)
        rest = ~nuclei & (own[..., 0] < TISSUE_LIGHTNESS)
        density.append(nuclei.mean())
        for name, fn in maps.items():
            lab = rgb2lab(fn(i, rgb) / 255.0)
            nucleus_l, rest_l = lab[nuclei][:, 0].mean(), lab[rest][:, 0].mean()
            rows[name].append((nucleus_l, rest_l - nucleus_l, np.sqrt(((lab - own) ** 2).sum(-1)).mean()))
    print(f"{len(ids)} CoNSeP images, nuclear share {min(density):.2f}-{max(density):.2f}")
    print("map       r(share, nuclei L*)  sd(nuclei L*)  sd(contrast L*)  mean ΔE")
    for name, values in rows.items():
        v = np.array(values)
        r = np.corrcoef(density, v[:, 0])[0, 1]
        print(f"{name:9s} {r:+20.2f} {v[:, 0].std():14.2f} {v[:, 1].std():16.2f} {v[:, 2].mean():8.1f}")


if __name__ == "__main__":
    main()
