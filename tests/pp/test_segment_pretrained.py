"""``segment_nuclei(method="instanseg")``: a real (tiny, untrained) InstanSeg model, and its pretrained model offline.

InstanSeg's published weights cannot be fetched here, so the real path runs on a TorchScript model built with
InstanSeg's own classes (a two-level U-Net and its pixel classifier, random weights), exported as InstanSeg exports
its models. The offline test refuses every network connection and checks the error says where the weights go.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import spatialdata as sd
from scipy import ndimage as ndi

import ghist

pytest.importorskip("instanseg", reason="the `instanseg` extra (instanseg-torch) is installed by the test extra")


@pytest.fixture(scope="module")
def small():
    sdata = ghist.datasets.synthetic(image_size=160, n_genes=5, seed=0)
    return sd.SpatialData(images={"he": sdata.images["he"]})


@pytest.fixture(scope="module")
def tiny_instanseg(tmp_path_factory):
    """A TorchScript InstanSeg model of 1 µm pixels, random weights, saved as ``instanseg.pt``."""
    import torch
    from instanseg.utils.loss.instanseg_loss import InstanSeg as InstanSegMethod
    from instanseg.utils.loss.instanseg_loss import InstanSeg_Torchscript
    from instanseg.utils.model_loader import build_model_from_dict

    torch.manual_seed(0)
    settings = {
        "model_str": "InstanSeg_UNet",
        "dim_in": 3,
        "layers": (8, 16),
        "multihead": False,
        "cells_and_nuclei": False,
        "dim_seeds": 1,
        "dim_coords": 2,
        "n_sigma": 2,
        "norm": "BATCH",
        "dropprob": 0.0,
    }
    net = InstanSegMethod(n_sigma=2, dim_coords=2, device="cpu").initialize_pixel_classifier(
        build_model_from_dict(settings)
    )
    with warnings.catch_warnings():  # InstanSeg's export enters CUDA autocast, which warns without CUDA
        warnings.simplefilter("ignore", UserWarning)
        module = torch.jit.script(InstanSeg_Torchscript(net, pixel_size=1.0, n_sigma=2, backbone_dim_in=3))
    folder = tmp_path_factory.mktemp("instanseg_model")
    torch.jit.save(module, str(folder / "instanseg.pt"))
    return folder


class _Spy:
    """Wraps InstanSeg's TorchScript module: runs it for real, records its input, answers dark blobs as nuclei.

    A random network finds no nuclei, so the answer is made from the image it was given (at the model's pixel size),
    and what is checked is the adapter: resampling to the model's 0.5 µm, labels back on the block's grid.
    """

    def __init__(self, module):
        self.module, self.inputs = module, []
        self.pixel_size, self.cells_and_nuclei = module.pixel_size, module.cells_and_nuclei
        self.graph = module.graph  # InstanSeg reads the accepted keyword arguments from the TorchScript graph

    def to(self, *args, **kwargs):
        return self

    def __call__(self, x, **kwargs):
        import torch

        self.inputs.append(tuple(x.shape))
        real = self.module(x, **kwargs)
        assert real.shape[-2:] == x.shape[-2:]
        assert real.shape[1] == 1
        grey = x[0].mean(0).numpy()
        blobs = ndi.label(grey < np.percentile(grey, 20))[0]
        return torch.from_numpy(blobs.astype(np.float32))[None, None]


@pytest.mark.slow  # builds and runs a real InstanSeg network (about 10 s)
def test_instanseg_model_file_and_object(small, tiny_instanseg, offline, monkeypatch):
    import torch
    from instanseg import InstanSeg

    # from the folder (or file) of a TorchScript model: loaded, nothing fetched; labels on the block grid
    labels = ghist.pp.segment_nuclei(
        small, key_added="from_file", method="instanseg", model=tiny_instanseg, progress=False
    )
    assert labels.dtype == np.int32
    assert labels.shape == small.images["he"].shape[1:]
    # as an InstanSeg object, with the network spied on: the block goes in at the model's pixel size (0.5 -> 1 µm)
    runner = InstanSeg(torch.jit.load(str(tiny_instanseg / "instanseg.pt")), verbosity=0)
    spy = runner.instanseg = _Spy(runner.instanseg)
    ghist.pp.segment_nuclei(
        small, key_added="spied", method="instanseg", model=runner, chunk_size=128, min_area_um2=2, progress=False
    )
    assert spy.inputs, "the InstanSeg network was not called"
    shape = small.images["he"].shape[1:]
    assert all(s[-1] <= shape[1] // 2 + 1 for s in spy.inputs)  # blocks (with halo) at half the side
    found = np.asarray(small.labels["spied"].data.compute())
    assert found.shape == shape
    assert found.max() > 5
    with pytest.raises(TypeError, match="Unknown option"):
        ghist.pp.segment_nuclei(small, key_added="x", method="instanseg", model=runner, progress=False, bogus=1)
    del small.labels["from_file"], small.labels["spied"]


def test_instanseg_pretrained_offline(small, offline, tmp_path):
    # the default model is InstanSeg's brightfield_nuclei, fetched on first use: offline, a named error
    with pytest.raises(FileNotFoundError, match=r"could not fetch .*'brightfield_nuclei'.*instanseg_models.*\.pt"):
        ghist.pp.segment_nuclei(small, key_added="is", method="instanseg", pixel_size=0.25, progress=False)
    with pytest.raises(ValueError, match="Unknown InstanSeg model 'no_such_model'"):
        ghist.pp.segment_nuclei(small, key_added="is", method="instanseg", model="no_such_model", progress=False)
    with pytest.raises(FileNotFoundError, match=r"holds no `instanseg\.pt`"):
        ghist.pp.segment_nuclei(small, key_added="is", method="instanseg", model=tmp_path, progress=False)
    with pytest.raises(TypeError, match="InstanSeg model name"):
        ghist.pp.segment_nuclei(small, key_added="is", method="instanseg", model=3, progress=False)
    assert "is" not in small.labels
