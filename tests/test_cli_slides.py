"""``ghist segment`` / ``predict`` / ``cohort`` over slide files: one store per slide, skip, resume, failures."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import spatialdata as sd
import tifffile

import ghist
from ghist._cli import main

from .io.test_wsi import _write_pyramid

TISSUE = ["--tissue-min-area", "1000"]  # the test slides hold about 0.01 mm² of tissue


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    return np.asarray(ghist.datasets.synthetic(image_size=192, n_genes=8, seed=0).images["he"]).transpose(1, 2, 0)


def _slides(folder: Path, he: np.ndarray, n: int) -> list[Path]:
    """``n`` small pyramidal TIFFs, tissue on glass, each a different view of the synthetic H&E."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        canvas = np.full((224, 224, 3), 243, np.uint8)
        canvas[16:208, 16:208] = np.rot90(he, k=i % 4) if i < 4 else he[::-1]
        path = folder / f"slide{i}.tif"
        _write_pyramid(path, np.ascontiguousarray(canvas), mpp=0.5, n_levels=2)
        paths.append(path)
    return paths


def _files(store: Path) -> dict[str, tuple[int, str]]:
    """Every file of a store: relative path -> (mtime in ns, sha256)."""
    return {
        str(p.relative_to(store)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


def test_arguments_fail_before_any_slide(tmp_path, capsys):
    assert main(["segment", str(tmp_path)]) == 2
    assert "holds no slide file" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "*.svs")]) == 2
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path), "--workers", "0"])
    (tmp_path / "a.tif").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.svs").write_bytes(b"x")
    assert main(["segment", str(tmp_path / "a.tif"), str(tmp_path / "sub"), "--out", str(tmp_path / "o")]) == 2
    assert "would share the store" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "a.tif"), "--model", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.zarr"))  # nothing written


@pytest.mark.slow
def test_segment_writes_a_store_per_slide_and_reports_a_corrupt_file(tmp_path, he, capsys):
    slides = _slides(tmp_path / "slides", he, 2)
    (tmp_path / "slides" / "broken.svs").write_bytes(b"II*\0" + os.urandom(512))
    rc = main(["segment", str(tmp_path / "slides"), "--no-progress", "--chunk-size", "128", *TISSUE])
    out = capsys.readouterr()
    assert rc == 1
    assert "broken.svs: failed (ValueError: Cannot read" in out.out
    assert "2 done, 0 skipped, 1 failed" in out.out
    assert "FAILED broken.svs" in out.err
    for slide in slides:  # beside the slide by default
        store = sd.read_zarr(slide.with_suffix(".zarr"))
        assert set(store.labels) == {"nuclei"}
        assert set(store.shapes) == {"tissue"}
        assert not store.images  # the image stays in the slide file
    assert not (tmp_path / "slides" / "broken.zarr").exists()


@pytest.mark.slow
def test_predict_folder_then_rerun_rewrites_nothing(tmp_path, he, capsys):
    slides = _slides(tmp_path / "slides", he, 2)
    argv = [
        "predict",
        str(tmp_path / "slides"),
        "--model",
        "her2st-breast-spots",
        "--out",
        str(tmp_path / "out"),
        *TISSUE,
    ]
    assert main([*argv, "--no-progress"]) == 0
    stores = [tmp_path / "out" / f"{s.stem}.zarr" for s in slides]
    for store in stores:
        table = sd.read_zarr(store).tables["ghist"]
        assert table.n_obs > 20
        assert table.n_vars > 100  # the bundled model's panel
    before = {store: _files(store) for store in stores}
    capsys.readouterr()
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count(": skipped (store complete") == 2
    assert "0 done, 2 skipped, 0 failed" in out
    assert {store: _files(store) for store in stores} == before  # same files, mtimes and contents


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["tissue written", "first block segmented"])
def test_sigkill_during_the_third_slide_then_resume(tmp_path, he, kill_at):
    """Killed (SIGKILL) while the third of 5 slides runs: the rerun finishes all 5 and redoes nothing finished.

    How "nothing finished is redone" is checked: every file of the two finished stores, and every file of the
    elements the killed slide had finished, keeps its mtime (ns) and content hash through the rerun, the rerun
    reports the two finished slides as skipped, and it loads (logs) every segmentation block saved before the kill.
    """
    slides = _slides(tmp_path / "slides", he, 5)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ghist._cli", "predict", str(tmp_path / "slides"), "--out", str(out), "--no-progress"]
    cmd += [*TISSUE, "--chunk-size", "64"]  # 16 segmentation blocks per slide
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    third = out / "slide2.zarr"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 600
        # once the third slide's tissue is written, or its first block saved, it is mid-way: kill it there
        sign = "shapes/tissue/zarr.json" if kill_at == "tissue written" else ".ghist-segment-nuclei/block-*.npz"
        while not list(third.glob(sign)):
            assert proc.poll() is None, "the run ended before the third slide started"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        first_run = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert first_run.count(": done") == 2
    assert not (third / "tables" / "ghist").exists()
    finished = {s: _files(out / f"{s}.zarr") for s in ("slide0", "slide1")}
    partial = {k: v for k, v in _files(third).items() if k.startswith("shapes/")}
    assert partial
    blocks = [k for k in _files(third) if k.startswith(".ghist-segment-nuclei/block-")]
    assert blocks or kill_at == "tissue written"

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stdout.count(": skipped (store complete") == 2
    assert "3 done, 2 skipped, 0 failed" in rerun.stdout
    for slide in slides:
        store = sd.read_zarr(out / f"{slide.stem}.zarr")
        assert {"tissue", "nuclei", "ghist"} <= set(store.shapes) | set(store.labels) | set(store.tables)
        assert store.tables["ghist"].n_obs > 20
    assert {s: _files(out / f"{s}.zarr") for s in finished} == finished
    after = _files(third)
    assert {k: after[k] for k in partial} == partial  # the third slide's tissue was kept, not redone
    if blocks:  # the blocks saved before the kill were loaded, not segmented again
        assert f"Reused {len(blocks)} finished block(s) of an interrupted run" in rerun.stderr
    assert not [p for p in out.rglob(".ghist-*")]  # no scratch or checkpoint left

    # a corrupt file among them: reported by name, the run exits non-zero, the others are untouched
    (tmp_path / "slides" / "slide5.tif").write_bytes(b"II*\0" + b"\0" * 64)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert again.returncode == 1
    assert "slide5.tif: failed (ValueError: Cannot read" in again.stdout
    assert "0 done, 5 skipped, 1 failed" in again.stdout
    assert {s: _files(out / f"{s}.zarr") for s in finished} == finished


def test_store_of_another_slide_is_a_failure_not_an_overwrite(tmp_path, he, capsys):
    (slide,) = _slides(tmp_path / "slides", he, 1)
    store = tmp_path / "out" / "slide0.zarr"
    store.mkdir(parents=True)
    (store / "precious.txt").write_text("mine")
    rc = main(["segment", str(slide), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 1
    assert "slide0.tif: failed (ValueError:" in capsys.readouterr().out
    assert (store / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in store.iterdir()) == ["precious.txt"]
    tifffile.imread(slide)  # the slide is untouched too


@pytest.mark.slow
def test_cohort_segments_into_stores_and_summarises_each_slide(tmp_path, he, capsys):
    import anndata as ad

    slides = _slides(tmp_path / "slides", he, 2)
    output = tmp_path / "cohort.h5ad"
    argv = ["cohort", str(tmp_path / "slides"), "--out", str(tmp_path / "out"), "--output", str(output), *TISSUE]
    assert main([*argv, "--no-progress"]) == 0
    cohort = ad.read_h5ad(output)
    assert list(cohort.obs_names) == [s.stem for s in slides]
    assert (cohort[:, "n_cells"].X > 20).all()
    for slide in slides:  # the segmentation is kept in the slide's store
        assert set(sd.read_zarr(tmp_path / "out" / f"{slide.stem}.zarr").labels) == {"nuclei"}
    capsys.readouterr()
    assert main([*argv, "--no-progress"]) == 0
    assert "0 done, 2 skipped, 0 failed" in capsys.readouterr().out
    again = ad.read_h5ad(output)
    assert sorted(again.uns["ghist_cohort"]["cached"]) == sorted(s.stem for s in slides)  # not predicted again
    np.testing.assert_allclose(again.X, cohort.X)


@pytest.mark.slow
def test_workers_run_slides_on_a_local_dask_pool(tmp_path, he, capsys):
    slides = _slides(tmp_path / "slides", he, 2)
    (tmp_path / "slides" / "broken.tif").write_bytes(b"II*\0" + b"\0" * 64)
    argv = ["segment", str(tmp_path / "slides"), "--out", str(tmp_path / "out"), "--workers", "2", *TISSUE]
    assert main([*argv, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "2 done, 0 skipped, 1 failed" in out
    assert "broken.tif: failed (ValueError: Cannot read" in out
    for slide in slides:
        assert set(sd.read_zarr(tmp_path / "out" / f"{slide.stem}.zarr").labels) == {"nuclei"}
