"""The dataset registry, exercised through pooch against a local HTTP server (no internet, pooch not mocked)."""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import ghist
from ghist.datasets import _registry
from ghist.datasets._registry import RemoteFile


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve ``tmp_path / "served"`` on 127.0.0.1 at a free port; yields (folder, base URL, list of requested paths)."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(served)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv(_registry.BASE_URL_ENV, raising=False)
    monkeypatch.delenv(_registry.DATA_DIR_ENV, raising=False)
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", httpd.requests
    httpd.shutdown()
    httpd.server_close()


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_checks_hash_and_caches(server, tmp_path):
    served, base, requests = server
    payload = served / "table.csv"
    payload.write_text("gene,value\nERBB2,1\n" * 200)
    registry = {"table.csv": RemoteFile(f"{base}/table.csv", sha256(payload), description="test table")}
    cache = tmp_path / "cache"

    out = ghist.datasets.fetch("table.csv", path=cache, registry=registry, progress=False)
    assert out == cache / "table.csv"
    assert out.read_bytes() == payload.read_bytes()
    assert requests == ["/table.csv"]

    again = ghist.datasets.fetch("table.csv", path=cache, registry=registry, progress=False)
    assert again == out
    assert requests == ["/table.csv"]  # served from the cache, the server was not asked again


def test_wrong_hash_raises_and_keeps_nothing(server, tmp_path):
    served, base, requests = server
    (served / "table.csv").write_text("the real content\n")
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    registry = {"table.csv": RemoteFile(f"{base}/table.csv", wrong)}
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"(?i)hash"):
        ghist.datasets.fetch("table.csv", path=cache, registry=registry, retries=0, progress=False)
    assert requests == ["/table.csv"]
    assert not (cache / "table.csv").exists()


def test_corrupted_cache_is_downloaded_again(server, tmp_path):
    served, base, requests = server
    payload = served / "table.csv"
    payload.write_text("good\n")
    registry = {"table.csv": RemoteFile(f"{base}/table.csv", sha256(payload))}
    cache = tmp_path / "cache"
    ghist.datasets.fetch("table.csv", path=cache, registry=registry, progress=False)
    (cache / "table.csv").write_text("truncated")
    out = ghist.datasets.fetch("table.csv", path=cache, registry=registry, progress=False)
    assert out.read_text() == "good\n"
    assert len(requests) == 2


def test_base_url_env_and_data_dir_env(server, tmp_path, monkeypatch):
    served, base, requests = server
    payload = served / "table.csv"
    payload.write_text("mirror\n")
    # the registered URL is unreachable; the mirror given by the environment is used instead
    registry = {"table.csv": RemoteFile("http://127.0.0.1:9/nowhere/table.csv", sha256(payload))}
    monkeypatch.setenv(_registry.BASE_URL_ENV, base + "/")
    monkeypatch.setenv(_registry.DATA_DIR_ENV, str(tmp_path / "env_cache"))
    out = ghist.datasets.fetch("table.csv", registry=registry, progress=False)
    assert out == tmp_path / "env_cache" / "table.csv"
    assert requests == ["/table.csv"]
    # path= wins over the environment
    assert ghist.datasets.data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv(_registry.DATA_DIR_ENV)
    assert "ghist" in str(ghist.datasets.data_dir())


def make_xenium_bundle(folder: Path, name: str) -> Path:
    """A tiny stand-in for a Xenium output bundle: a zip holding outs/experiment.xenium and a cells table."""
    archive = folder / name
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("outs/experiment.xenium", '{"pixel_size": 0.2125}')
        zf.writestr("outs/cells.csv", "cell_id,x_centroid,y_centroid\n1,10.0,12.5\n")
    return archive


def test_xenium_breast_preview_offline(server, tmp_path, monkeypatch):
    served, base, requests = server
    files = _registry._XENIUM_SAMPLES["rep1"]
    make_xenium_bundle(served, files["outs"])
    (served / files["he_image"]).write_bytes(b"II*\x00" + bytes(2048))
    (served / files["alignment"]).write_text("1,0,0\n0,1,0\n0,0,1\n")
    # register the checksums of the stand-in files (the real ones are not known offline)
    for name in files.values():
        entry = _registry.REGISTRY[name]
        monkeypatch.setitem(
            _registry.REGISTRY, name, RemoteFile(entry.url, sha256(served / name), entry.unzip, entry.description)
        )
    monkeypatch.setenv(_registry.BASE_URL_ENV, base)
    cache = tmp_path / "cache"

    paths = ghist.datasets.xenium_breast_preview("rep1", path=cache, progress=False)
    assert set(paths) == {"outs", "he_image", "alignment"}
    assert (paths["outs"] / "experiment.xenium").is_file()
    assert (paths["outs"] / "cells.csv").read_text().startswith("cell_id")
    assert paths["alignment"].read_text().startswith("1,0,0")
    assert sorted(requests) == sorted(f"/{n}" for n in files.values())

    only_outs = ghist.datasets.xenium_breast_preview("rep1", path=cache, include_he=False, progress=False)
    assert only_outs == {"outs": paths["outs"]}
    assert len(requests) == 3  # all cached


def test_unverified_hash_downloads_with_a_warning(server, tmp_path, monkeypatch, caplog):
    served, base, requests = server
    name = "her2st_meta.zip"
    assert _registry.REGISTRY[name].known_hash is None  # not verified yet: no integrity check possible
    (served / name).write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip; the real one is encrypted
    monkeypatch.setenv(_registry.BASE_URL_ENV, base)
    monkeypatch.setattr(logging.getLogger("ghist"), "propagate", True)  # it does not propagate to caplog otherwise
    with caplog.at_level("WARNING", logger="ghist"):
        out = ghist.datasets.her2st(["meta"], path=tmp_path, progress=False)
    assert out == {"meta": tmp_path / name}
    assert out["meta"].read_bytes()[:4] == b"PK\x05\x06"
    assert requests == [f"/{name}"]
    assert any("not yet verified" in r.getMessage() for r in caplog.records)


def test_registry_entries_are_well_formed():
    assert len(_registry.REGISTRY) >= 12
    for name, entry in _registry.REGISTRY.items():
        assert entry.url.startswith("https://"), name
        assert entry.known_hash is None or entry.known_hash.split(":")[0] in {"sha256", "md5", "sha1"}, name
        assert entry.unzip == name.endswith("_outs.zip"), name
    for sample, files in _registry._XENIUM_SAMPLES.items():
        assert set(files) >= {"outs", "he_image"}, sample
        for name in files.values():
            assert name in _registry.REGISTRY
            assert _registry.REGISTRY[name].url.startswith("https://cf.10xgenomics.com/samples/xenium/")
    assert all(
        e.url.startswith("https://zenodo.org/records/3957257/") for n, e in _registry.REGISTRY.items() if "her2st" in n
    )


def test_bad_names():
    with pytest.raises(KeyError, match="not a registered"):
        ghist.datasets.fetch("nope.zip")
    with pytest.raises(ValueError, match="rep3"):
        ghist.datasets.xenium_breast_preview("rep3")
    with pytest.raises(ValueError, match="counts"):
        ghist.datasets.her2st(["counts"])


def test_sdata_reader_needs_spatialdata_io(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "spatialdata_io", None)  # makes `import spatialdata_io` fail
    with pytest.raises(ImportError, match="requires spatialdata-io"):
        ghist.datasets.xenium_breast_preview_sdata("rep1", path=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was downloaded before the check
