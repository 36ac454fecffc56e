"""The StarDist and Cellpose backends of ``segment_nuclei``: local weights, pretrained names, one model call at a time.

Cellpose (3.x, its small CPnet) runs for real on a randomly initialised network saved to a temporary file, and its
default model's fetch fails offline with a named error. StarDist needs TensorFlow, which CI does not install (see
``.ci/run``): its code path runs with stand-in ``stardist`` and ``csbdeep`` modules. InstanSeg: test_segment_pretrained.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types

import numpy as np
import pytest
import spatialdata as sd
from scipy import ndimage as ndi

import ghist


@pytest.fixture(scope="module")
def small():
    sdata = ghist.datasets.synthetic(image_size=192, n_genes=5, seed=0)
    return sd.SpatialData(images={"he": sdata.images["he"]})


def _labels(sdata: sd.SpatialData, key: str) -> np.ndarray:
    return np.asarray(sdata.labels[key].data.compute())


# ---------------------------------------------------------------------------------------------------- Cellpose, real


@pytest.mark.slow  # a real Cellpose network on CPU
def test_cellpose_from_local_weights(small, offline, tmp_path, monkeypatch):
    import torch
    from cellpose import models

    torch.manual_seed(0)
    saved = models.CellposeModel(gpu=False, pretrained_model=False)  # random CPnet, nothing downloaded
    path = tmp_path / "cpnet_random.pth"
    saved.net.save_model(str(path))

    built, calls = [], []

    class Recording(models.CellposeModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

        def eval(self, x, **kwargs):
            calls.append(kwargs)
            return super().eval(x, **kwargs)

    monkeypatch.setattr(models, "CellposeModel", Recording)
    ghist.pp.segment_nuclei(small, key_added="cp", method="cellpose", model=path, progress=False, diameter=12)
    labels = small.labels["cp"]
    assert labels.dtype == np.int32
    assert labels.shape == small.images["he"].shape[1:]
    assert _labels(small, "cp").min() >= 0
    # the file's weights were loaded, H&E went in as grey and the user's options were passed on
    assert len(built) == 1

    def dense(tensors):  # Cellpose keeps some CPU tensors in MKL-DNN layout, and drops batch-norm counters
        return {k: v.to_dense() if v.is_mkldnn else v for k, v in tensors.items() if "num_batches" not in k}

    loaded, expected = dense(built[0].net.state_dict()), dense(saved.net.state_dict())
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value)
    assert calls == [{"channels": [0, 0], "diameter": 12}]
    del small.labels["cp"]


def test_cellpose_missing_weights_file_is_not_downloaded(small, offline, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth' not found"):
        ghist.pp.segment_nuclei(small, key_added="cp", method="cellpose", model=tmp_path / "nope.pth", progress=False)
    assert "cp" not in small.labels


def test_cellpose_default_model_offline(small, offline, tmp_path, monkeypatch):
    from cellpose import models

    folder = tmp_path / "cellpose_models"
    monkeypatch.setattr(models, "MODEL_DIR", folder)  # read by Cellpose at import; the fixture's variable is too late
    # Cellpose fetches its `nuclei` model on first use: offline that fails, saying what to fetch and where to put it
    with pytest.raises(FileNotFoundError, match=r"could not fetch .* 'nuclei'.*nucleitorch_0.*cellpose_models"):
        ghist.pp.segment_nuclei(small, key_added="cp", method="cellpose", progress=False)
    assert "cp" not in small.labels


# ------------------------------------------------------------------------------------------ duck-typed model objects


class _DarkBlobs:
    """A stand-in model: connected dark regions of the (normalised) image are nuclei; records concurrent calls."""

    def __init__(self):
        self.active = 0
        self.most_active = 0
        self.calls = []
        self.lock = threading.Lock()

    def _labels(self, image, kwargs):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.calls.append(kwargs)
        time.sleep(0.01)  # overlapping calls would show here
        image = np.asarray(image, dtype=float)
        labels = ndi.label(image.mean(-1) < np.percentile(image.mean(-1), 15))[0].astype(np.int32)
        with self.lock:
            self.active -= 1
        return labels

    def predict_instances(self, image, **kwargs):  # StarDist2D
        return self._labels(image, kwargs), {}

    def eval(self, image, **kwargs):  # CellposeModel
        return self._labels(image, kwargs), None, None


@pytest.fixture
def fake_stardist(monkeypatch):
    """Stand-in ``stardist.models`` and ``csbdeep.utils`` modules; ``loaded`` records the folders StarDist2D opened."""
    loaded = []

    class StarDist2D(_DarkBlobs):
        def __init__(self, config, name, basedir):
            super().__init__()
            assert config is None  # load, not create
            loaded.append((name, basedir))

    def normalize(x, pmin, pmax, axis):
        lo, hi = np.percentile(x, [pmin, pmax], axis=axis, keepdims=True)
        return (x - lo) / (hi - lo + 1e-20)

    for name, attrs in [
        ("stardist", {}),
        ("stardist.models", {"StarDist2D": StarDist2D}),
        ("csbdeep", {}),
        ("csbdeep.utils", {"normalize": normalize}),
    ]:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    return loaded


@pytest.mark.parametrize("method", ["stardist", "cellpose"])
def test_model_called_one_block_at_a_time(small, method, fake_stardist):
    model = _DarkBlobs()
    kwargs = {"chunk_size": 64, "num_workers": 4, "progress": False}
    ghist.pp.segment_nuclei(small, key_added="serial", method=method, model=model, **{**kwargs, "num_workers": 1})
    ghist.pp.segment_nuclei(small, key_added="threads", method=method, model=model, **kwargs)
    assert model.most_active == 1
    assert len(model.calls) == 2 * 9
    np.testing.assert_array_equal(_labels(small, "threads"), _labels(small, "serial"))
    assert _labels(small, "serial").max() > 0
    del small.labels["serial"], small.labels["threads"]


def test_stardist_model_folder(small, offline, fake_stardist, tmp_path):
    folder = tmp_path / "he_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_rays": 32}))
    with pytest.raises(FileNotFoundError, match=r"weights file \(\*\.h5"):
        ghist.pp.segment_nuclei(small, key_added="sd", method="stardist", model=folder, progress=False)
    assert not fake_stardist
    (folder / "weights_best.weights.h5").write_bytes(b"")
    ghist.pp.segment_nuclei(small, key_added="sd", method="stardist", model=str(folder), progress=False)
    assert fake_stardist == [("he_model", str(tmp_path))]
    assert _labels(small, "sd").dtype == np.int32
    assert _labels(small, "sd").max() > 0
    del small.labels["sd"]


def test_stardist_bad_models(small, fake_stardist, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ghist.pp.segment_nuclei(small, key_added="sd", method="stardist", model=tmp_path / "nope", progress=False)
    with pytest.raises(TypeError, match="predict_instances"):
        ghist.pp.segment_nuclei(small, key_added="sd", method="stardist", model=object(), progress=False)
    assert "sd" not in small.labels


def test_stardist_pretrained_by_name(small, fake_stardist, monkeypatch, caplog):
    StarDist2D = sys.modules["stardist.models"].StarDist2D
    fetched = []

    def from_pretrained(name):
        fetched.append(name)
        if name not in ("2D_versatile_he", "2D_versatile_fluo"):
            raise ValueError(f"unknown model {name!r}")
        if name == "2D_versatile_fluo":  # Keras' get_file raises a bare Exception when a fetch fails
            raise Exception("URL fetch failure on https://github.com/stardist/...: None -- [Errno 101] unreachable")
        return StarDist2D(None, name=name, basedir="~/.keras/models/StarDist2D")

    monkeypatch.setattr(StarDist2D, "from_pretrained", staticmethod(from_pretrained), raising=False)
    with caplog.at_level("WARNING", logger="ghist"):
        ghist.pp.segment_nuclei(small, key_added="sd", method="stardist", progress=False)  # the default model
    assert fetched == ["2D_versatile_he"]
    assert "non-commercial" in caplog.text
    assert _labels(small, "sd").max() > 0
    with pytest.raises(FileNotFoundError, match=r"could not fetch.*'2D_versatile_fluo'.*\.keras.*StarDist2D"):
        ghist.pp.segment_nuclei(small, key_added="sd2", method="stardist", model="2D_versatile_fluo", progress=False)
    with pytest.raises(ValueError, match="no pretrained model 'nope'"):
        ghist.pp.segment_nuclei(small, key_added="sd2", method="stardist", model="nope", progress=False)
    assert "sd2" not in small.labels
    del small.labels["sd"]


def test_model_with_wrong_output_shape(small):
    class Cropping(_DarkBlobs):
        def eval(self, image, **kwargs):
            return self._labels(image, kwargs)[1:], None, None

    with pytest.raises(RuntimeError, match="returned shape"):
        ghist.pp.segment_nuclei(
            small, key_added="cropped", method="cellpose", model=Cropping(), num_workers=2, progress=False
        )
    assert "cropped" not in small.labels
