from __future__ import annotations

import pytest
import spatialdata

import ghist


@pytest.fixture(scope="session")
def train_sdata_session():
    return ghist.datasets.synthetic(image_size=256, n_genes=24, seed=0)


@pytest.fixture(scope="session")
def test_sdata_session():
    return ghist.datasets.synthetic(image_size=192, n_genes=24, seed=1)


@pytest.fixture
def test_sdata(test_sdata_session):
    return spatialdata.deepcopy(test_sdata_session)


@pytest.fixture(scope="session")
def tiles(train_sdata_session, tmp_path_factory):
    return ghist.pp.make_tiles(
        train_sdata_session, cell_type_key="cell_type", tile_size=64, path=tmp_path_factory.mktemp("tiles") / "t.zarr"
    )


@pytest.fixture(scope="session")
def reference(train_sdata_session):
    genes = list(train_sdata_session.tables["table"].var_names)
    cells = ghist.datasets.synthetic_reference(n_cells_per_type=30, genes=genes, seed=0)
    return ghist.pp.reference_profiles(cells, "cell_type")


@pytest.fixture(scope="session")
def trained(tiles, reference, tmp_path_factory):
    """A tiny model trained for real: shared by the predict/evaluate tests."""
    groups = {"immune": [t for t in tiles.cell_types if t in ("T", "B", "Plasma")][:2] or tiles.cell_types[:1]}
    model = ghist.tl.fit(
        tiles,
        reference=reference,
        cell_type_groups=groups,
        width=8,
        embed_dim=32,
        max_epochs=15,
        batch_size=4,
        lr=3e-3,
        seed=0,
        precision="32-true",  # what the predict/evaluate tests expect of it, whatever the CPU
        progress=False,
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
    )
    return model
