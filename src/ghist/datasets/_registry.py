"""Registry of public real datasets, downloaded on demand with :mod:`pooch` and cached locally.

Each file of each dataset is listed once in :data:`REGISTRY` (file name -> URL, checksum). A checksum is
``"sha256:<hex>"`` (or another :func:`pooch.file_hash` algorithm, ``"md5:<hex>"``); ``None`` means it has not
been verified yet: such a file is downloaded without an integrity check and a warning is logged. To record one,
download the file once and run ``pooch.file_hash(path)``.

The cache folder is, in order: the ``path`` argument, the ``GHIST_DATA_DIR`` environment variable, or the
operating system's cache (:func:`pooch.os_cache`, e.g. ``~/.cache/ghist`` on Linux). Setting
``GHIST_DATA_BASE_URL`` (or passing ``base_url``) downloads every file from ``<base_url>/<file name>`` instead of
its registered URL, e.g. from a local mirror.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._constants import IMAGE_KEY

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

__all__ = [
    "REGISTRY",
    "RemoteFile",
    "data_dir",
    "fetch",
    "her2st",
    "xenium_breast_preview",
    "xenium_breast_preview_sdata",
]

DATA_DIR_ENV = "GHIST_DATA_DIR"
BASE_URL_ENV = "GHIST_DATA_BASE_URL"


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file of the registry.

    Attributes
    ----------
    url
        Where the file is published.
    known_hash
        ``"sha256:<hex>"`` (any :func:`pooch.file_hash` algorithm), or ``None`` when not verified yet.
    unzip
        Extract the archive after download (into a folder named after the file, without ``.zip``).
    description
        What the file is, shown in error messages and docs.

    """

    url: str
    known_hash: str | None = None
    unzip: bool = False
    description: str = ""


_TENX = "https://cf.10xgenomics.com/samples/xenium"
_REP = "Xenium_FFPE_Human_Breast_Cancer_Rep{}"
_S2 = "Xenium_V1_FFPE_Preview_Human_Breast_Cancer_Sample_2"
_HER2ST = "https://zenodo.org/records/3957257/files"


def _tenx(version: str, sample: str, suffix: str, unzip: bool, description: str) -> tuple[str, RemoteFile]:
    name = f"{sample}_{suffix}"
    # sha256 not yet verified: these were not downloadable where the registry was written (no internet).
    return name, RemoteFile(f"{_TENX}/{version}/{sample}/{name}", None, unzip, description)


#: File name -> :class:`RemoteFile`. Sources: the 10x Genomics "FFPE Human Breast using the Entire Sample Area"
#: Xenium preview data (Janesick et al., Nat. Commun. 14, 8353, 2023; CC BY 4.0) and the HER2-positive breast tumour
#: spatial transcriptomics data of Andersson et al. (Nat. Commun. 12, 6012, 2021; Zenodo record 3957257).
REGISTRY: dict[str, RemoteFile] = dict(
    [
        _tenx("1.0.1", _REP.format(1), "outs.zip", True, "Xenium output bundle, In Situ Sample 1, Replicate 1"),
        _tenx("1.0.1", _REP.format(1), "he_image.ome.tif", False, "post-Xenium H&E image, Sample 1, Replicate 1"),
        _tenx("1.0.1", _REP.format(1), "he_imagealignment.csv", False, "H&E-to-Xenium affine, Sample 1, Replicate 1"),
        _tenx("1.0.1", _REP.format(2), "outs.zip", True, "Xenium output bundle, In Situ Sample 1, Replicate 2"),
        _tenx("1.0.1", _REP.format(2), "he_image.ome.tif", False, "post-Xenium H&E image, Sample 1, Replicate 2"),
        _tenx("1.0.1", _REP.format(2), "he_imagealignment.csv", False, "H&E-to-Xenium affine, Sample 1, Replicate 2"),
        _tenx("1.4.0", _S2, "outs.zip", True, "Xenium output bundle, In Situ Sample 2"),
        _tenx("1.4.0", _S2, "he_image.ome.tif", False, "post-Xenium H&E image, In Situ Sample 2"),
    ]
    + [
        # sha256 not yet verified (see above). The archives are encrypted: no automatic extraction.
        (f"her2st_{name}", RemoteFile(f"{_HER2ST}/{name}?download=1", None, False, f"HER2ST {what} (encrypted zip)"))
        for name, what in [
            ("count-matrices.zip", "spot count matrices"),
            ("images.zip", "H&E images"),
            ("meta.zip", "metadata"),
            ("spot-selections.zip", "spot selections and coordinates"),
        ]
    ]
)

_XENIUM_SAMPLES: dict[str, dict[str, str]] = {
    "rep1": {
        "outs": f"{_REP.format(1)}_outs.zip",
        "he_image": f"{_REP.format(1)}_he_image.ome.tif",
        "alignment": f"{_REP.format(1)}_he_imagealignment.csv",
    },
    "rep2": {
        "outs": f"{_REP.format(2)}_outs.zip",
        "he_image": f"{_REP.format(2)}_he_image.ome.tif",
        "alignment": f"{_REP.format(2)}_he_imagealignment.csv",
    },
    "sample2": {"outs": f"{_S2}_outs.zip", "he_image": f"{_S2}_he_image.ome.tif"},
}
_HER2ST_PARTS = ("count-matrices", "images", "meta", "spot-selections")


def data_dir(path: str | PathLike | None = None) -> Path:
    """Folder where downloaded datasets are cached.

    Parameters
    ----------
    path
        Explicit folder. Otherwise ``$GHIST_DATA_DIR`` when set, else the operating system's cache folder for
        ``ghist`` (:func:`pooch.os_cache`).

    Returns
    -------
    The cache folder (not created by this call).

    Examples
    --------
    >>> ghist.datasets.data_dir()  # e.g. PosixPath('/home/me/.cache/ghist')

    """
    import pooch

    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(pooch.os_cache("ghist"))


def fetch(
    name: str,
    *,
    path: str | PathLike | None = None,
    base_url: str | None = None,
    registry: Mapping[str, RemoteFile] | None = None,
    retries: int = 2,
    progress: bool = True,
) -> Path:
    """Download one registered file into the cache (once) and return its local path.

    A file already in the cache whose checksum matches is not downloaded again; one whose checksum does not match is
    downloaded again, and a download whose checksum does not match the registry raises :class:`ValueError` and is
    not kept. Zip archives registered with ``unzip=True`` are extracted next to the archive.

    Parameters
    ----------
    name
        File name, a key of :data:`REGISTRY` (or of ``registry``).
    path
        Cache folder; see :func:`data_dir`.
    base_url
        Download from ``<base_url>/<name>`` instead of the registered URL (a mirror, or a local server in tests).
        Defaults to ``$GHIST_DATA_BASE_URL`` when set.
    registry
        Registry to look ``name`` up in instead of :data:`REGISTRY`.
    retries
        How many times a failed download is retried.
    progress
        Show a download progress bar.

    Returns
    -------
    Path of the downloaded file or, for archives that are extracted, of the folder they were extracted into.

    Examples
    --------
    >>> ghist.datasets.fetch("Xenium_FFPE_Human_Breast_Cancer_Rep1_he_imagealignment.csv")

    """
    import pooch

    registry = REGISTRY if registry is None else registry
    if name not in registry:
        raise KeyError(f"{name!r} is not a registered dataset file; known files: {sorted(registry)}.")
    entry = registry[name]
    base_url = base_url if base_url is not None else os.environ.get(BASE_URL_ENV) or None
    url = entry.url if base_url is None else f"{base_url.rstrip('/')}/{name}"
    cache = data_dir(path)
    if entry.known_hash is None:
        logger.warning(
            "No checksum is recorded for %r (sha256 not yet verified): its download is not checked for integrity.", name
        )
    pup = pooch.create(
        path=cache, base_url="", registry={name: entry.known_hash}, urls={name: url}, retry_if_failed=retries
    )
    processor = pooch.Unzip(extract_dir=_extract_dir(name)) if entry.unzip else None
    logger.info("Fetching %r (%s) into %s", name, entry.description or url, cache)
    result = pup.fetch(name, processor=processor, downloader=pooch.HTTPDownloader(progressbar=progress))
    if entry.unzip:
        return cache / _extract_dir(name)
    return Path(result)


def xenium_breast_preview(
    sample: Literal["rep1", "rep2", "sample2"] = "rep1",
    *,
    path: str | PathLike | None = None,
    include_he: bool = True,
    progress: bool = True,
) -> dict[str, Path]:
    """Download the 10x Genomics Xenium human breast cancer preview data (Janesick et al. 2023), with its H&E.

    The FFPE breast cancer sections of the Xenium preview release, the data used in the GHIST paper: a 313-gene
    panel measured by Xenium and a post-Xenium H&E image of the same section. Files are downloaded once and cached
    (several GB per sample; see :func:`data_dir`). Data © 10x Genomics, CC BY 4.0.

    Parameters
    ----------
    sample
        ``"rep1"`` (In Situ Sample 1, Replicate 1, as in the GHIST paper), ``"rep2"`` (Sample 1, Replicate 2) or
        ``"sample2"`` (In Situ Sample 2; no H&E alignment file is published for it).
    path
        Cache folder; see :func:`data_dir`.
    include_he
        Also download the H&E image and its alignment to the Xenium coordinates.
    progress
        Show download progress bars.

    Returns
    -------
    Local paths: ``"outs"`` (the extracted Xenium output folder, the one holding ``experiment.xenium``), and with
    ``include_he`` also ``"he_image"`` (OME-TIFF) and, where published, ``"alignment"`` (CSV with the 3x3 affine from
    H&E pixels to Xenium pixels).

    Examples
    --------
    >>> paths = ghist.datasets.xenium_breast_preview("rep1")
    >>> sdata = spatialdata_io.xenium(paths["outs"])

    """
    files = _xenium_files(sample)
    out: dict[str, Path] = {}
    for kind, name in files.items():
        if kind != "outs" and not include_he:
            continue
        out[kind] = fetch(name, path=path, progress=progress)
    out["outs"] = _bundle_root(out["outs"])
    return out


def xenium_breast_preview_sdata(
    sample: Literal["rep1", "rep2", "sample2"] = "rep1",
    *,
    path: str | PathLike | None = None,
    include_he: bool = True,
    image_key: str = IMAGE_KEY,
    progress: bool = True,
    **reader_kwargs: Any,
) -> SpatialData:
    """Download the Xenium breast cancer preview data and read it as a :class:`spatialdata.SpatialData`.

    Requires the optional package ``spatialdata-io`` (``pip install spatialdata-io``), which is not a dependency of
    ghist. The files are those of :func:`xenium_breast_preview`.

    Parameters
    ----------
    sample
        ``"rep1"``, ``"rep2"`` or ``"sample2"``; see :func:`xenium_breast_preview`.
    path
        Cache folder; see :func:`data_dir`.
    include_he
        Add the H&E image, aligned to the Xenium coordinates with the published alignment, as
        ``sdata.images[image_key]``. ``"sample2"`` has no published alignment: its H&E is added without one.
    image_key
        Key of the H&E image in ``sdata.images``.
    progress
        Show download progress bars.
    **reader_kwargs
        Passed to :func:`spatialdata_io.xenium`.

    Returns
    -------
    The Xenium data as read by :func:`spatialdata_io.xenium` (nucleus labels ``"nucleus_labels"``, the cell table
    ``"table"``), plus the H&E image.

    Examples
    --------
    >>> sdata = ghist.datasets.xenium_breast_preview_sdata("rep1")

    """
    try:
        import spatialdata_io
    except ImportError as err:
        raise ImportError(
            "`ghist.datasets.xenium_breast_preview_sdata` requires spatialdata-io, which is not installed: "
            "`pip install spatialdata-io`, or download the files only with `ghist.datasets.xenium_breast_preview`."
        ) from err
    paths = xenium_breast_preview(sample, path=path, include_he=include_he, progress=progress)
    sdata = spatialdata_io.xenium(paths["outs"], **reader_kwargs)
    if include_he:
        if "alignment" not in paths:
            logger.warning("No H&E alignment is published for %r: the H&E image is added without one.", sample)
        sdata.images[image_key] = spatialdata_io.xenium_aligned_image(paths["he_image"], paths.get("alignment"))
    return sdata


def her2st(
    parts: Sequence[str] | None = None,
    *,
    path: str | PathLike | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Download the HER2-positive breast tumour spatial transcriptomics data (HER2ST; Andersson et al. 2021).

    36 sections from 8 patients, legacy ST (spot-level, 100 µm spots) with H&E images, from Zenodo record 3957257.
    The archives are encrypted by their authors: extract them with 7-Zip and the passwords published in the
    README of the authors' repository (github.com/almaan/her2st). They are therefore not extracted here.

    Parameters
    ----------
    parts
        Which archives to download, among ``"count-matrices"``, ``"images"``, ``"meta"`` and ``"spot-selections"``.
        All by default.
    path
        Cache folder; see :func:`data_dir`.
    progress
        Show download progress bars.

    Returns
    -------
    Part name -> local path of its (encrypted) zip archive.

    Examples
    --------
    >>> ghist.datasets.her2st(["count-matrices", "images", "spot-selections"])

    """
    parts = list(_HER2ST_PARTS if parts is None else parts)
    unknown = [p for p in parts if p not in _HER2ST_PARTS]
    if unknown:
        raise ValueError(f"Unknown HER2ST part(s) {unknown}; choose from {list(_HER2ST_PARTS)}.")
    return {p: fetch(f"her2st_{p}.zip", path=path, progress=progress) for p in parts}


def _xenium_files(sample: str) -> dict[str, str]:
    if sample not in _XENIUM_SAMPLES:
        raise ValueError(f"Unknown Xenium breast preview sample {sample!r}; choose from {list(_XENIUM_SAMPLES)}.")
    return _XENIUM_SAMPLES[sample]


def _extract_dir(name: str) -> str:
    return name[: -len(".zip")] if name.endswith(".zip") else f"{name}.unzipped"


def _bundle_root(folder: Path) -> Path:
    """The folder holding ``experiment.xenium`` inside an extracted output bundle (the bundle may nest it)."""
    if (folder / "experiment.xenium").exists():
        return folder
    found = sorted(folder.rglob("experiment.xenium"), key=lambda p: len(p.parts))
    if not found:
        logger.warning("No `experiment.xenium` found under %s; returning the extraction folder.", folder)
        return folder
    return found[0].parent
