"""predict keeps one row per cell while it runs (memory follows cells, not the tiles that saw them)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import ghist
from ghist._memory import release_freed_memory
from ghist._model._inference import Predictor


@pytest.fixture(scope="module")
def sdata():
    return ghist.datasets.synthetic(image_size=256, n_genes=8, seed=0)


def test_compacting_while_predicting_gives_the_same_table(sdata, monkeypatch):
    torch.manual_seed(0)
    model = ghist.GHISTModel(list(sdata["table"].var_names), ["A", "B", "C"], width=4, embed_dim=16, tile_size=64)
    kwargs = {"tile_overlap": 31, "batch_size": 2, "progress": False, "key_added": "once"}  # every cell in many tiles
    seen = []
    original = Predictor.run

    def counting(self, batches, **kw):
        out = original(self, batches, **kw)
        seen.append(out["cell_id"].size)
        return out

    monkeypatch.setattr(Predictor, "run", counting)
    monkeypatch.setitem(original.__kwdefaults__, "compact_every", 10**9)  # only at the end
    reference = ghist.tl.predict(sdata, model, **kwargs)
    monkeypatch.setitem(original.__kwdefaults__, "compact_every", 1)  # after every batch
    compacted = ghist.tl.predict(sdata, model, **{**kwargs, "key_added": "often"})
    assert seen == [reference.n_obs, compacted.n_obs]  # run already returns one row per cell
    np.testing.assert_array_equal(reference.X, compacted.X)
    pd.testing.assert_frame_equal(reference.obs, compacted.obs)
    np.testing.assert_array_equal(reference.obsm["spatial"], compacted.obsm["spatial"])


def test_release_freed_memory_trims_the_heap_where_it_can(monkeypatch):
    import sys

    from ghist import _memory

    if sys.platform == "linux":  # glibc: the real function is found
        assert callable(_memory._malloc_trim())
    calls = []
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: calls.append)
    release_freed_memory()
    assert calls == [0]  # malloc_trim(0): trim everything above the heap's minimum
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: None)  # no malloc_trim here: a no-op, not an error
    assert release_freed_memory() is None
