"""The prediction core of `_model`: slide tiles as a Dataset, one device resolver, the Predictor."""

from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

import ghist
from ghist._model._data import SLIDE_CELL_KEYS, SlideTileDataset, collate_slide_tiles, collate_tiles
from ghist._model._device import ACCELERATORS, check_accelerator, lightning_accelerator, resolve_device
from ghist._model._inference import Predictor, forward_views, refine_indices


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _slide(size=96, seed=0):
    """A dask-backed RGB image and numpy labels with a few square nuclei (one crossing a tile edge)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(3, size, size), dtype=np.uint8)
    image = xr.DataArray(da.from_array(rgb, chunks=(3, 32, 32)), dims=("c", "y", "x"))
    labels = np.zeros((size, size), dtype=np.int32)
    labels[5:15, 5:12] = 7
    labels[40:50, 28:36] = 3  # crosses x = 32
    labels[70:80, 70:90] = 12
    return image, xr.DataArray(labels, dims=("y", "x")), rgb


def _dataset(image, labels, *, scale=1.0, tile=32):
    origins = np.array([(y, x) for y in range(0, 96, tile) for x in range(0, 96, tile)])
    return SlideTileDataset(
        image,
        labels,
        origins,
        scale=scale,
        to_labels=np.diag([1 / scale, 1 / scale, 1.0]),
        tile_size=tile,
        mean=[100.0, 110.0, 120.0],
        std=[50.0, 40.0, 30.0],
    )


def test_slide_tiles_have_the_tile_item_format():
    image, labels, rgb = _slide()
    ds = _dataset(image, labels)
    assert len(ds) == 9
    item = ds[0]
    assert item["image"].dtype == torch.float32
    assert item["image"].shape == (3, 32, 32)
    expected = (rgb[:, :32, :32].astype(np.float32) - np.array([100, 110, 120], np.float32)[:, None, None]) / np.array(
        [50, 40, 30], np.float32
    )[:, None, None]
    np.testing.assert_array_equal(item["image"].numpy(), expected)
    assert item["labels"].dtype == torch.int64
    assert item["cell_id"].tolist() == [7]
    assert set(item["labels"].unique().tolist()) == {0, 1}  # nuclei renumbered 1..N, as in TileSet items
    assert item["expr"].shape == (1, 0)
    assert item["cell_type"].tolist() == [-1]
    assert item["visible"].tolist() == [70]
    # pixel (i, j) has its centre at (j + 0.5, i + 0.5): the one centroid rule (ghist._centroids)
    np.testing.assert_allclose(item["centroid"].numpy(), [[8.5, 10.0]])
    np.testing.assert_allclose(item["margin"].numpy(), [8.0])
    # the nucleus crossing a tile edge is seen in part by both tiles
    left, right = ds[3], ds[4]
    assert left["cell_id"].tolist() == [3]
    assert right["cell_id"].tolist() == [3]
    assert int(left["visible"][0]) + int(right["visible"][0]) == 80
    with pytest.raises(IndexError):
        ds[9]


def test_collate_slide_tiles_reuses_collate_tiles_and_skips_empty_tiles():
    image, labels, _ = _slide()
    ds = _dataset(image, labels)
    items = [ds[i] for i in range(len(ds))]
    empty = [i for i, it in enumerate(items) if it["cell_id"].numel() == 0]
    assert empty
    assert collate_slide_tiles([items[i] for i in empty]) is None
    batch = collate_slide_tiles(items)
    reference = collate_tiles([it for it in items if it["cell_id"].numel()])
    for key in ("image", "labels", "cell_id", "cell_batch", "tile"):
        torch.testing.assert_close(batch[key], reference[key])
    assert batch["n_cells"] == reference["n_cells"] == 4
    for key in SLIDE_CELL_KEYS:
        assert batch[key].shape[0] == 4
    # batch label j > 0 is row j - 1 of the cells
    for j, cell in enumerate(batch["cell_id"].tolist(), start=1):
        tile = int(batch["cell_batch"][j - 1])
        assert (batch["labels"][tile] == j).any(), cell


def test_slide_dataset_stays_lazy_and_pickles():
    image, labels, _ = _slide()
    ds = _dataset(image, labels, scale=0.75)
    assert isinstance(ds.image.data, da.Array)  # nothing computed when the dataset is built
    copy = pickle.loads(pickle.dumps(ds))
    for i in range(len(ds)):
        a, b = ds[i], copy[i]
        for key in ("image", "labels", "cell_id", "visible", "margin", "centroid"):
            torch.testing.assert_close(a[key], b[key])
    # resampled tiles outside the image are white
    far = SlideTileDataset(
        image,
        labels,
        [(200, 200)],
        scale=0.75,
        to_labels=np.diag([4 / 3, 4 / 3, 1]),
        tile_size=16,
        mean=[0] * 3,
        std=[1] * 3,
    )[0]
    assert (far["image"] == 255).all()
    assert far["cell_id"].numel() == 0


def test_one_device_resolver():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert lightning_accelerator(torch.device("cpu")) == "cpu"
    assert check_accelerator("gpu") == "gpu"
    with pytest.raises(ValueError, match=r"one of .*'auto'.*'cpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="accelerator"):
        check_accelerator(None)
    assert set(ACCELERATORS) == {"auto", "cpu", "gpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("gpu")


def _tiny_model():
    torch.manual_seed(0)
    return ghist.GHISTModel(
        [f"g{i}" for i in range(5)],
        ["A", "B", "C"],
        cell_type_groups={"ab": ["A", "B"]},
        width=4,
        embed_dim=16,
        tile_size=32,
        mean=[100.0, 110.0, 120.0],
        std=[50.0, 40.0, 30.0],
    )


def test_predictor_outputs_and_refinement_controls():
    image, labels, _ = _slide()
    model = _tiny_model()
    batch = collate_slide_tiles([_dataset(image, labels)[i] for i in range(9)])
    out = Predictor(model, alpha=0, seed=0)(batch)
    n = batch["n_cells"]
    assert out.expr.shape == (n, 5)
    assert (out.expr >= 0).all()
    assert out.proba.shape == (n, 3)
    assert out.composition.shape == (n, 3)
    assert out.type_entropy.shape == (n,)
    assert out.type_score is None  # scores belong to types from reference profiles
    np.testing.assert_allclose(out.proba.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(out.cell_type, out.proba.argmax(1))  # alpha=0: plain argmax
    # The fused copy matches the network itself.
    network = model.network.eval()
    with torch.inference_mode():
        raw = network(batch["image"], batch["labels"], batch["cell_batch"], n)
    np.testing.assert_allclose(out.expr, (raw["expr"] / model.expr_scale).clamp(min=0).numpy(), atol=1e-4)
    # Seeded: the same seed gives the same refinement; the model is not moved nor put in training mode.
    a, b = Predictor(model, seed=3)(batch), Predictor(model, seed=3)(batch)
    np.testing.assert_array_equal(a.proba, b.proba)
    assert next(model.network.parameters()).device.type == "cpu"
    assert refine_indices(model, ["C", "A"]) == [2, 0]
    assert refine_indices(model, None) is None
    with pytest.raises(KeyError, match="refine_types"):
        Predictor(model, refine_types=["Z"])
    with pytest.raises(ValueError, match="alpha"):
        Predictor(model, alpha=-1)


def test_slide_batches_skip_empty_tiles_and_carry_the_tile_bookkeeping():
    image, labels, _ = _slide()
    ds = _dataset(image, labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_slide_tiles)
    batches = list(loader)
    kept = [b for b in batches if b is not None]
    assert len(kept) < len(batches)  # some pairs of tiles hold no nucleus
    ids = torch.cat([b["cell_id"] for b in kept])
    assert sorted(ids.tolist()) == [3, 3, 7, 12]
    for key in SLIDE_CELL_KEYS:
        assert torch.cat([b[key] for b in kept]).shape[0] == 4


def test_forward_views_averages_softmax_over_the_eight_views():
    model = _tiny_model()
    network = model.network.eval()
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 32, 32, generator=gen)
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 3:9, 20:27] = 1
    labels[0, 15:19, 4:15] = 2
    cell_batch = torch.tensor([0, 0])
    with torch.inference_mode():
        averaged = forward_views(network, image, labels, cell_batch, 2, tta=True)
        views = []
        for flip in (False, True):
            for k in range(4):
                img, lab = (image.flip(-1), labels.flip(-1)) if flip else (image, labels)
                views.append(network(torch.rot90(img, k, (-2, -1)), torch.rot90(lab, k, (-2, -1)), cell_batch, 2))
    expected = torch.stack([torch.softmax(v["cell_logits"], -1) for v in views]).mean(0)
    torch.testing.assert_close(averaged["proba"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(averaged["expr"], torch.stack([v["expr"] for v in views]).mean(0), rtol=1e-4, atol=1e-4)
    assert set(averaged["group_expr"]) == {"ab"}
