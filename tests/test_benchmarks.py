"""Benchmarks that reach into private modules still run against them (a refactor of the tile reader once broke one)."""

from pathlib import Path

import numpy as np
from spatialdata.models import Image2DModel, Labels2DModel
from spatialdata.transformations import get_transformation

import ghist

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_tile_reads_sweep_reads_every_tile_through_the_chunk_cache(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import tile_reads

    sdata = ghist.datasets.synthetic(image_size=256, n_genes=4, seed=0)
    for kind, model_type in (("images", Image2DModel), ("labels", Labels2DModel)):
        element = getattr(sdata, kind)["he" if kind == "images" else "nuclei"]
        dims = element.dims
        parsed = model_type.parse(
            np.asarray(element.data), dims=dims, chunks=64, transformations=get_transformation(element, get_all=True)
        )
        getattr(sdata, kind)["he" if kind == "images" else "nuclei"] = parsed
    model = ghist.GHISTModel(["G0", "G1"], ["A", "B"], width=8, embed_dim=16, tile_size=64, pixel_size=0.5)
    seconds, n_tiles, decoded = tile_reads.sweep(sdata, model, 8)
    assert n_tiles == 25  # windows at 0, 56, 112, 168 and 192 along each axis of 256 px
    # 16 chunks of 64 px in the labels and 16 in the image, each decoded at least once
    assert decoded >= 32
    assert seconds > 0
