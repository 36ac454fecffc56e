"""Block checkpoints of ``segment_nuclei`` into a backed SpatialData: a crash loses only the blocks in flight.

Each finished block's window labels and the objects it keeps are saved, before stitching, as one ``.npz`` file moved
into ``<store>/.ghist-segment-<key>/`` by one rename (a file is there whole or not at all). Stitching is cheap and
deterministic, so a resumed run loads the saved blocks instead of segmenting them again and stitches every block in
the same order: the labels, ids included, are those of an uninterrupted run. The folder's name starts with ``.``, so
spatialdata never reads it; it is removed once the labels are written. A ``params.json`` records what the blocks
depend on; blocks saved under other parameters are discarded, not reused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .._constants import CHECKPOINT_PREFIX
from .._folders import replaced_file

logger = logging.getLogger(__name__)

_PARAMS = "params.json"


class BlockCheckpoint:
    """The saved blocks of one segmentation into one store."""

    def __init__(self, folder: Path, params: dict[str, Any]):
        self.folder = folder
        params = json.loads(json.dumps(params, default=repr))  # what a reload compares against
        saved = folder / _PARAMS
        if folder.is_dir():
            try:
                old = json.loads(saved.read_text())
            except (OSError, ValueError):
                old = None
            if old != params:
                logger.info("Discarding the segmentation blocks in %s: saved with other parameters.", folder)
                shutil.rmtree(folder)
        if not folder.is_dir():
            folder.mkdir(parents=True)
            with replaced_file(saved) as scratch:
                scratch.write_bytes(json.dumps(params, sort_keys=True).encode())
        self.n_loaded = 0

    def _file(self, block: tuple[int, int, int, int]) -> Path:
        y0, _, x0, _ = block
        return self.folder / f"block-{y0}-{x0}.npz"

    def load(self, block: tuple[int, int, int, int]) -> tuple[tuple[int, ...], np.ndarray, np.ndarray] | None:
        """``(window, local labels, keep)`` of a saved block, or ``None``."""
        path = self._file(block)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                out = tuple(int(v) for v in saved["window"]), saved["local"], saved["keep"]
        except (OSError, ValueError, KeyError):  # unreadable: segment the block again
            logger.warning("Segmentation checkpoint %s is unreadable; segmenting the block again.", path)
            return None
        self.n_loaded += 1
        return out

    def save(
        self, block: tuple[int, int, int, int], window: tuple[int, ...], local: np.ndarray, keep: np.ndarray
    ) -> None:
        """Save one finished block, whole or not at all."""
        path = self._file(block)
        with replaced_file(path) as scratch, open(scratch, "wb") as fh:
            np.savez_compressed(fh, window=np.asarray(window, np.int64), local=local, keep=keep)

    def remove(self) -> None:
        """Delete the checkpoint (the labels are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def checkpoint_for(sdata: Any, key_added: str, params: dict[str, Any]) -> BlockCheckpoint | None:
    """The block checkpoint of a segmentation into ``sdata``'s store, or ``None`` when ``sdata`` is not backed."""
    if getattr(sdata, "path", None) is None or not Path(sdata.path).is_dir():
        return None
    return BlockCheckpoint(Path(sdata.path) / f"{CHECKPOINT_PREFIX}{key_added}", params)
