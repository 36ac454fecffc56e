from __future__ import annotations

import numpy as np
import pytest

import ghist


def test_save_load_roundtrip(trained, test_sdata, tmp_path):
    trained.save(tmp_path / "model")
    loaded = ghist.GHISTModel.load(tmp_path / "model")
    assert loaded.genes == trained.genes
    assert loaded.cell_types == trained.cell_types
    assert loaded.cell_type_groups == trained.cell_type_groups
    assert loaded.init_params_ == trained.init_params_
    assert loaded.is_trained_
    a = ghist.tl.predict(test_sdata, trained, key_added="a", progress=False)
    b = ghist.tl.predict(test_sdata, loaded, key_added="b", progress=False)
    np.testing.assert_array_equal(a.X, b.X)
    assert (a.obs["ghist_cell_type"] == b.obs["ghist_cell_type"]).all()
    assert "GHISTModel (trained" in repr(loaded)


def test_save_refuses_overwrite_and_load_checks(trained, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        trained.save(tmp_path / "m")
    trained.save(tmp_path / "m", overwrite=True)
    with pytest.raises(ValueError, match="other genes"):
        ghist.GHISTModel.load(tmp_path / "m", genes=["NOTAGENE"])
    with pytest.raises(FileNotFoundError):
        ghist.GHISTModel.load(tmp_path / "missing")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_model_validates_arguments():
    with pytest.raises(ValueError, match="duplicates"):
        ghist.GHISTModel(["A", "A"])
    with pytest.raises(ValueError, match="reference"):
        ghist.GHISTModel(["A", "B"], reference=np.zeros((3, 5)))
    with pytest.raises(ValueError, match="needs cell types"):
        ghist.GHISTModel(["A"], cell_type_groups={"g": ["T"]})
