"""The field's nucleus models by name in ``segment_nuclei``: InstanSeg, StarDist and Cellpose, through their packages.

Each is an optional dependency. Without ``model=`` the package's own pretrained H&E nucleus model is used, its weights
fetched the way the package does on first use and cached where it caches them; offline, the fetch fails with a
``FileNotFoundError`` saying which file to fetch elsewhere and where to put it. A ``model=`` can also be a model
object of the package or a local file or folder, which is never downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

_Segmenter = Callable[[np.ndarray], np.ndarray]


class Pretrained(NamedTuple):
    """A package's pretrained H&E nucleus model: its name there, its working pixel size (µm) and its terms."""

    name: str
    pixel_size: float | None
    terms: str


#: The model each method uses when no ``model=`` is given.
PRETRAINED: dict[str, Pretrained] = {
    "instanseg": Pretrained(
        "brightfield_nuclei", 0.5, "InstanSeg's weights are released under the Apache-2.0 licence."
    ),
    "stardist": Pretrained(
        "2D_versatile_he",
        None,
        "StarDist's '2D_versatile_he' was trained on the MoNuSeg 2018 and TNBC images, whose terms allow "
        "non-commercial research use only: check them before using its results commercially.",
    ),
    "cellpose": Pretrained("nuclei", None, "Cellpose's models are released under the BSD-3-Clause licence."),
}

#: Context (µm) InstanSeg's network needs around a nucleus (its U-Net sees about 64 of its 0.5 µm pixels around one).
INSTANSEG_MARGIN_UM = 32.0


def _offline_error(method: str, name: str, err: BaseException, where: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"method={method!r} could not fetch the weights of its pretrained model {name!r} "
        f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'}). "
        f"The package downloads them on first use; on a machine without internet access, {where}"
    )


def _import_error(method: str, package: str) -> ImportError:
    return ImportError(
        f"method={method!r} needs the optional dependency `{package}`; install it with `pip install 'ghist[{method}]'`."
    )


# ----------------------------------------------------------------------------------------------------------------------
# InstanSeg
# ----------------------------------------------------------------------------------------------------------------------


def instanseg_segmenter(model: Any, pixel_size: float, method_kwargs: dict[str, Any]) -> tuple[_Segmenter, float]:
    """InstanSeg's segmenter of one window (``(H, W, 3)`` uint8 at ``pixel_size``) and the margin it needs (pixels).

    ``model``: ``None`` (InstanSeg's ``brightfield_nuclei``), an InstanSeg model name, an ``instanseg.InstanSeg``, a
    TorchScript module exported by InstanSeg, or the path of its ``instanseg.pt`` (or of the folder holding it).
    InstanSeg rescales each window to its model's pixel size and its labels back.
    """
    try:
        import torch
        from instanseg import InstanSeg
    except ImportError as err:
        raise _import_error("instanseg", "instanseg-torch") from err

    if model is None:
        model = PRETRAINED["instanseg"].name
    if isinstance(model, InstanSeg):
        runner = model
    elif isinstance(model, torch.jit.ScriptModule):
        runner = InstanSeg(model, verbosity=0)
    elif isinstance(model, str | os.PathLike):
        runner = InstanSeg(_instanseg_module(model), verbosity=0)
    else:
        raise TypeError(
            "`model` for method='instanseg' must be an InstanSeg model name, an `instanseg.InstanSeg`, its TorchScript "
            f"module or the path of an `instanseg.pt`; got {type(model).__name__}."
        )
    if not hasattr(runner.instanseg, "pixel_size"):
        raise TypeError("`model` for method='instanseg' is not an InstanSeg model: it has no `pixel_size`.")
    known = {"min_size", "mask_threshold", "peak_distance", "seed_threshold", "overlap_threshold", "fg_threshold"}
    unknown = sorted(set(method_kwargs) - known)
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown} for method='instanseg'; expected some of {sorted(known)}.")
    options = dict(method_kwargs)

    def segment(rgb: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, 0))).float()
        with warnings.catch_warnings():  # InstanSeg enters CUDA autocast, which warns on a machine without CUDA
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            labels = runner.eval_small_image(
                image, pixel_size=pixel_size, target="nuclei", return_image_tensor=False, **options
            )
        labels = labels[0, 0] if labels.ndim == 4 else labels[0]
        return labels.detach().to("cpu").numpy().astype(np.int32, copy=False)

    model_pixel_size = float(runner.instanseg.pixel_size) or pixel_size
    return segment, INSTANSEG_MARGIN_UM * max(1.0, model_pixel_size / 0.5) / pixel_size


def _instanseg_module(model: str | os.PathLike) -> Any:
    """InstanSeg's TorchScript module from a local file or folder, else fetched by name as InstanSeg does."""
    import torch

    path = Path(model)
    if path.is_dir():
        path = path / "instanseg.pt"
        if not path.is_file():
            raise FileNotFoundError(f"InstanSeg model folder {str(path.parent)!r} holds no `instanseg.pt`.")
    if path.is_file():
        # An InstanSeg model is a TorchScript program, loaded as InstanSeg itself loads it: pass files you trust.
        return torch.jit.load(str(path), map_location="cpu")
    if path.suffix or len(path.parts) > 1:
        raise FileNotFoundError(f"InstanSeg model file {str(model)!r} not found.")
    return _fetch_instanseg(str(model))


def _instanseg_index() -> list[dict[str, Any]]:
    from pkgutil import get_data

    return json.loads(get_data("instanseg", "bioimageio_models/model-index.json").decode("utf-8"))


def _fetch_instanseg(name: str) -> Any:
    """``download_model(name)`` of InstanSeg (cached in its models folder), with a named error offline."""
    from instanseg.utils import utils as instanseg_utils

    index = {entry["name"]: entry for entry in _instanseg_index()}
    if name not in index:
        raise ValueError(
            f"Unknown InstanSeg model {name!r}; InstanSeg publishes {sorted(index)} (or pass the path of an "
            "`instanseg.pt`)."
        )
    folder = Path(
        os.environ.get("INSTANSEG_BIOIMAGEIO_PATH")
        or Path(instanseg_utils.__file__).resolve().parent.parent / "bioimageio_models"
    )
    target = folder / name / index[name]["version"]
    try:
        return instanseg_utils.download_model(name, verbose=False)
    except (OSError, zipfile.BadZipFile) as err:  # requests' errors are OSErrors; a cut download is a bad zip
        raise _offline_error(
            "instanseg",
            name,
            err,
            f"download {index[name]['url']} elsewhere and unzip it into {str(target)!r} (it must hold "
            "`instanseg.pt`; the environment variable INSTANSEG_BIOIMAGEIO_PATH moves that folder), or pass "
            "`model=` the path of that `instanseg.pt`.",
        ) from err


# ----------------------------------------------------------------------------------------------------------------------
# StarDist
# ----------------------------------------------------------------------------------------------------------------------


def stardist_segmenter(model: Any, method_kwargs: dict[str, Any]) -> _Segmenter:
    """StarDist's segmenter of one window.

    ``model``: ``None`` (``2D_versatile_he``), a pretrained name, a ``StarDist2D`` or the folder of a saved one.
    """
    try:
        from csbdeep.utils import normalize
        from stardist.models import StarDist2D
    except ImportError as err:
        raise _import_error("stardist", "stardist") from err
    if model is None:
        model = PRETRAINED["stardist"].name
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.is_dir():
            # Without weights StarDist2D would log a line and carry on with random ones.
            weights = [p for p in path.iterdir() if p.suffix in (".h5", ".hdf5")]
            if not (path / "config.json").is_file() or not weights:
                raise FileNotFoundError(
                    f"StarDist model folder {str(path)!r} must hold `config.json` and a weights file (*.h5 or "
                    f"*.hdf5); it holds {sorted(p.name for p in path.iterdir())}."
                )
            model = StarDist2D(None, name=path.name, basedir=str(path.parent))
        elif path.suffix or len(path.parts) > 1:
            raise FileNotFoundError(f"StarDist model folder {str(model)!r} not found.")
        else:
            model = _fetch_stardist(StarDist2D, str(model))
    if not hasattr(model, "predict_instances"):
        raise TypeError(f"`model` must be a StarDist2D model (with `predict_instances`), got {type(model).__name__}.")

    def segment(rgb: np.ndarray) -> np.ndarray:
        labels, _ = model.predict_instances(normalize(rgb, 1, 99.8, axis=(0, 1)), **method_kwargs)
        return np.asarray(labels, dtype=np.int32)

    return segment


def _fetch_stardist(model_class: Any, name: str) -> Any:
    if name == PRETRAINED["stardist"].name:
        logger.warning(PRETRAINED["stardist"].terms)
    try:
        model = model_class.from_pretrained(name)
    except ValueError as err:  # a name StarDist does not register
        raise ValueError(f"StarDist has no pretrained model {name!r} ({err}).") from err
    except Exception as err:  # Keras' get_file raises a bare Exception when the fetch fails
        folder = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / model_class.__name__ / name
        raise _offline_error(
            "stardist",
            name,
            err,
            f"run `StarDist2D.from_pretrained({name!r})` on a connected machine and copy the folder it fills, "
            f"{str(folder)!r}, to the same place here (or pass `model=` that folder: it holds `config.json`, "
            "`thresholds.json` and `weights_best.h5`).",
        ) from err
    if model is None:
        raise ValueError(f"StarDist has no pretrained model {name!r}.")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Cellpose
# ----------------------------------------------------------------------------------------------------------------------


def cellpose_segmenter(model: Any, method_kwargs: dict[str, Any]) -> _Segmenter:
    """Cellpose's segmenter of one window.

    ``model``: ``None`` (its ``nuclei`` model), a built-in model name, a ``CellposeModel`` or a weights file's path.
    """
    try:
        from cellpose import models
    except ImportError as err:
        raise _import_error("cellpose", "cellpose") from err
    if model is None:
        model = PRETRAINED["cellpose"].name
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.is_file():
            model = models.CellposeModel(pretrained_model=str(path))
        elif isinstance(model, str) and model in getattr(models, "MODEL_NAMES", ()):
            model = _fetch_cellpose(models, model)
        else:
            # Given a path that does not exist, Cellpose would fall back to downloading its default model.
            raise FileNotFoundError(
                f"Cellpose weights file {str(model)!r} not found (`model` must be a local weights file or one of "
                f"Cellpose's model names {list(getattr(models, 'MODEL_NAMES', []))[:4]}...)."
            )
    if not hasattr(model, "eval"):
        raise TypeError(f"`model` must be a Cellpose model (with `eval`), got {type(model).__name__}.")
    kwargs = dict(method_kwargs)
    if _major_version("cellpose") < 4:
        # Cellpose 3 networks take two channels and would use R and G of an RGB image; H&E goes in as grey.
        kwargs.setdefault("channels", [0, 0])

    def segment(rgb: np.ndarray) -> np.ndarray:
        masks = model.eval(rgb, **kwargs)[0]
        return np.asarray(masks, dtype=np.int32)

    return segment


def _fetch_cellpose(models: Any, name: str) -> Any:
    folder = Path(getattr(models, "MODEL_DIR", Path.home() / ".cellpose" / "models"))
    url = getattr(models, "_MODEL_URL", "https://www.cellpose.org/models")
    try:
        return models.CellposeModel(model_type=name)
    except OSError as err:  # urllib's URLError and socket errors
        files = f"`{name}torch_0`" if name in ("nuclei", "cyto", "cyto2") else f"`{name}`"
        raise _offline_error(
            "cellpose",
            name,
            err,
            f"download {files} from {url}/ elsewhere into {str(folder)!r} (the environment variable "
            "CELLPOSE_LOCAL_MODELS_PATH moves that folder), or pass `model=` the path of a weights file.",
        ) from err


def _major_version(package: str) -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version(package).split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0
