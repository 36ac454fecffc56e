"""``segment_nuclei(num_workers=...)``: blocks segmented in threads, stitched in block order; progress and log line."""

from __future__ import annotations

import re
import threading
import time

import geopandas as gpd
import numpy as np
import pytest
import spatialdata as sd
from shapely.geometry import Polygon
from spatialdata.models import ShapesModel
from spatialdata.transformations import Identity

import ghist
from ghist.pp import _segment
from ghist.pp._segment import _ordered, default_n_workers

CHUNK = 256
LOG_LINE = re.compile(r"Segmented (\d+) nuclei .*: ([\d.]+) Mpx in ([\d.]+) s, ([\d.]+) Mpx/s \((\d+) workers?\)")


@pytest.fixture(scope="module")
def slide():
    """The default synthetic slide (1024 x 1024 px: 16 blocks of 256) with a triangular region of interest."""
    sdata = ghist.datasets.synthetic(n_genes=5, seed=0)
    triangle = Polygon([(0, 0), (1024, 0), (0, 700)])  # x, y in the image's (global) pixels
    sdata.shapes["roi"] = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=[triangle]), transformations={"global": Identity()}
    )
    return sd.SpatialData(images={"he": sdata.images["he"]}, shapes={"roi": sdata.shapes["roi"]})


def test_parallel_equals_serial_on_a_slide_file(slide, tmp_path):
    """A tiled pyramidal TIFF read lazily by ``read_wsi`` (tiffslide): worker threads share the file."""
    import tifffile

    rgb = np.moveaxis(np.asarray(slide.images["he"].data), 0, -1)
    path = tmp_path / "slide.tif"
    resolution = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(rgb, subifds=1, tile=(128, 128), photometric="rgb", **resolution)
        tif.write(rgb[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb", **resolution)
    wsi = ghist.io.read_wsi(path, chunk_size=512)
    ghist.pp.segment_nuclei(wsi, key_added="serial", chunk_size=CHUNK, num_workers=1, progress=False)
    ghist.pp.segment_nuclei(wsi, key_added="parallel", chunk_size=CHUNK, num_workers=2, progress=False)
    serial = _labels(wsi, "serial")
    assert serial.max() > 500
    np.testing.assert_array_equal(_labels(wsi, "parallel"), serial)


def _labels(sdata: sd.SpatialData, key: str) -> np.ndarray:
    return np.asarray(sdata.labels[key].data.compute())


@pytest.mark.parametrize("roi_key", [None, "roi"])
def test_parallel_equals_serial(slide, roi_key, monkeypatch):
    threads: set[str] = set()
    make_backend = _segment.make_backend

    def recording_backend(*args, **kwargs):
        backend = make_backend(*args, **kwargs)

        def segment(rgb):
            threads.add(threading.current_thread().name)
            return backend.segment(rgb)

        return backend._replace(segment=segment)

    monkeypatch.setattr(_segment, "make_backend", recording_backend)
    kwargs = {"chunk_size": CHUNK, "roi_key": roi_key, "progress": False}
    ghist.pp.segment_nuclei(slide, key_added="serial", num_workers=1, **kwargs)
    assert threads == {threading.current_thread().name}
    threads.clear()
    ghist.pp.segment_nuclei(slide, key_added="parallel", num_workers=2, **kwargs)
    assert len(threads) == 2
    assert all(name.startswith("ghist-segment") for name in threads)
    serial, parallel = _labels(slide, "serial"), _labels(slide, "parallel")
    assert serial.max() > 500
    np.testing.assert_array_equal(parallel, serial)
    if roi_key is not None:  # the blocks wholly outside the triangle are not segmented
        assert not serial[-CHUNK:, -CHUNK:].any()
        assert serial[:CHUNK, :CHUNK].any()
    del slide.labels["serial"], slide.labels["parallel"]


@pytest.mark.parametrize("roi_key", [None, "roi"])
def test_log_line_states_throughput(slide, roi_key, caplog):
    with caplog.at_level("INFO", logger="ghist"):
        ghist.pp.segment_nuclei(
            slide, key_added="logged", chunk_size=CHUNK, num_workers=2, roi_key=roi_key, progress=False
        )
    lines = [m for m in map(LOG_LINE.search, caplog.messages) if m]
    assert len(lines) == 1, caplog.messages
    n_nuclei, mpx, seconds, rate, workers = lines[0].groups()
    assert int(n_nuclei) == _labels(slide, "logged").max()
    # full blocks: 16 x 256² px; with the triangle, the 4 + 3 + 2 blocks touching it
    assert float(mpx) == pytest.approx((16 if roi_key is None else 9) * CHUNK**2 / 1e6, abs=0.01)
    # The line rounds seconds to 0.1 and Mpx, Mpx/s to 0.01: the rate must be Mpx over some time that rounds to the
    # seconds logged (a run under 0.05 s logs "0.0 s", which bounds the rate from below only).
    fastest, slowest = max(float(seconds) - 0.05, 0.0), float(seconds) + 0.05
    assert float(rate) >= (float(mpx) - 0.005) / slowest - 0.005
    assert fastest == 0 or float(rate) <= (float(mpx) + 0.005) / fastest + 0.005
    assert int(workers) == 2
    del slide.labels["logged"]


def test_progress_bar_in_megapixels(slide, capsys):
    ghist.pp.segment_nuclei(slide, key_added="shown", chunk_size=CHUNK, num_workers=2, progress=True)
    err = capsys.readouterr().err
    assert "1.05/1.05 Mpx" in err
    assert "Mpx/s" in err
    assert re.search(r"nuclei=\d+", err)
    del slide.labels["shown"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_n_workers_validated(slide, bad):
    with pytest.raises(ValueError, match="num_workers"):
        ghist.pp.segment_nuclei(slide, key_added="bad", num_workers=bad, progress=False)
    assert "bad" not in slide.labels


def test_default_n_workers_follows_affinity(monkeypatch):
    monkeypatch.setattr(_segment.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_n_workers() == _segment.MAX_DEFAULT_WORKERS
    monkeypatch.setattr(_segment.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert default_n_workers() == 1
    monkeypatch.delattr(_segment.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(_segment.os, "cpu_count", lambda: 2)
    assert default_n_workers() == 2


def test_ordered_keeps_order_and_bounds_blocks_in_flight():
    started: list[int] = []

    def work(i):
        started.append(i)
        time.sleep(0.01 * (i % 3 == 0))  # some blocks finish out of order
        return i

    consumed = []
    for result in _ordered(work, range(30), n_workers=3):
        time.sleep(0.005)  # let the workers run ahead as far as they may
        consumed.append(result)
        assert len(started) <= len(consumed) + 2 * 3
    assert consumed == list(range(30))


def test_worker_error_stops_the_run(slide, monkeypatch):
    calls = []
    make_backend = _segment.make_backend

    def failing_backend(*args, **kwargs):
        backend = make_backend(*args, **kwargs)

        def segment(rgb):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("block failed")
            return backend.segment(rgb)

        return backend._replace(segment=segment)

    monkeypatch.setattr(_segment, "make_backend", failing_backend)
    with pytest.raises(RuntimeError, match="block failed"):
        ghist.pp.segment_nuclei(slide, key_added="failed", chunk_size=128, num_workers=2, progress=False)
    assert "failed" not in slide.labels
    assert len(calls) < 64  # the queued blocks were cancelled, not all 8 x 8 run
