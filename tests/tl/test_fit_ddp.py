"""Distributed data-parallel training on CPU (gloo): two processes train one model as well as one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import ghist
    from ghist._model._data import collate_tiles

    out, strategy, devices, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    sdata = ghist.datasets.synthetic(image_size=256, n_genes=24, seed=0)
    tiles = ghist.pp.TileSet.open(os.path.join(out, "tiles.zarr")) if os.path.exists(os.path.join(out, "tiles.zarr")) \\
        else ghist.pp.make_tiles(sdata, cell_type_key="cell_type", tile_size=64, path=os.path.join(out, "tiles.zarr"),
                                 progress=False)
    model = ghist.tl.fit(
        tiles, width=8, embed_dim=32, max_epochs=24, batch_size=batch_size, lr=3e-3, seed=0, progress=False,
        precision="32-true", accelerator="cpu", strategy=strategy, devices=devices,
        checkpoint_dir=os.path.join(out, f"ckpt_{strategy}"),
    )
    rank = int(os.environ.get("LOCAL_RANK", 0))
    test = tiles.test
    batch = collate_tiles([test[i] for i in range(len(test))])
    model.network.eval()
    with torch.inference_mode():
        result = model.network(batch["image"], batch["labels"], batch["cell_batch"], int(batch["n_cells"]))
    logits = result["cell_logits"]
    known = batch["cell_type"] >= 0
    accuracy = float((logits.argmax(-1)[known] == batch["cell_type"][known]).float().mean())
    scores = model.history_["val_score"].tolist()
    with open(os.path.join(out, f"{strategy}_rank{rank}.json"), "w") as fh:
        json.dump({"accuracy": accuracy, "val_score": scores, "steps": int(model.history_["step"].max())}, fh)
    """
)


def _run(tmp_path, strategy: str, devices: int, batch_size: int) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path), strategy, str(devices), str(batch_size)],
        check=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_ddp_on_cpu_trains_like_one_process(tmp_path):
    _run(tmp_path, "auto", 1, 8)  # one process, batches of 8 tiles
    _run(tmp_path, "ddp", 2, 4)  # two processes of 4 tiles each (Lightning relaunches the script for rank 1, gloo)
    single = json.loads((tmp_path / "auto_rank0.json").read_text())
    ranks = [json.loads((tmp_path / f"ddp_rank{r}.json").read_text()) for r in (0, 1)]
    # every process scored the whole validation band: the same scores on both
    assert ranks[0]["val_score"] == pytest.approx(ranks[1]["val_score"])
    assert ranks[0]["accuracy"] == pytest.approx(ranks[1]["accuracy"])  # and ended with the same weights
    # the same effective batch, so the same number of steps, and the same quality
    assert ranks[0]["steps"] == single["steps"]
    assert ranks[0]["accuracy"] > 0.5
    assert ranks[0]["accuracy"] > single["accuracy"] - 0.1
    assert max(ranks[0]["val_score"]) > max(single["val_score"]) - 0.1
