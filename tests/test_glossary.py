"""ARCHITECTURE.md's glossary names every public parameter, and renamed parameters keep their old names for a while."""

from __future__ import annotations

import inspect
import re
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ghist
from ghist._deprecation import renamed_arguments

ROOT = Path(__file__).resolve().parents[1]
MODULES = (ghist.pp, ghist.tl, ghist.pl, ghist.io, ghist.datasets, ghist.models)


def public_callables() -> list[tuple[str, object]]:
    """Every public function, public method of a public class, and method of ``GHISTModel``, by name."""
    found = []
    for module in MODULES:
        short = module.__name__.split(".")[-1]
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                found.append((f"{short}.{name}", obj))
            elif inspect.isclass(obj):
                found += _methods(f"{short}.{name}", obj)
    return found + _methods("GHISTModel", ghist.GHISTModel)


def _methods(prefix: str, cls: type) -> list[tuple[str, object]]:
    return [
        (f"{prefix}.{name}", member)
        for name, member in inspect.getmembers(cls, lambda m: inspect.isfunction(m) or inspect.ismethod(m))
        if not name.startswith("_") or name == "__init__"
    ]


def public_parameters() -> dict[str, list[str]]:
    """Parameter name -> where it appears (``self``, and bare ``*args``/``**kwargs``, left out)."""
    uses: dict[str, list[str]] = {}
    for where, func in public_callables():
        for p in inspect.signature(func).parameters.values():
            if p.name in ("self", "cls", "args", "kwargs"):
                continue
            uses.setdefault(p.name, []).append(where)
    return uses


def glossary(text: str | None = None) -> tuple[set[str], set[str]]:
    """(names, deprecated aliases) of the table under ARCHITECTURE.md's "Glossary" heading."""
    text = (ROOT / "ARCHITECTURE.md").read_text() if text is None else text
    match = re.search(r"^## Glossary.*?\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "ARCHITECTURE.md has no '## Glossary' section"
    names, aliases = set(), set()
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or set(cells[0]) <= {"-"} or cells[0] == "name":
            continue
        names.update(re.findall(r"`(\w+)`", cells[0]))
        aliases.update(re.findall(r"`(\w+)`", cells[-1]))
    return names, aliases


def test_glossary_parser():
    text = (
        "## Glossary\n\n| name | means | aliases |\n|---|---|---|\n| `a`, `b` | x `c` | `d` (`f.g`) |\n\n"
        "## Next\n| `z` | | |"
    )
    assert glossary(text) == ({"a", "b"}, {"d"})


def test_every_public_parameter_is_in_the_glossary():
    names, aliases = glossary()
    uses = public_parameters()
    missing = {name: where[:3] for name, where in uses.items() if name not in names | aliases}
    assert not missing, f"add these parameters to ARCHITECTURE.md's glossary (or use its word): {missing}"


def test_glossary_has_no_stale_names():
    names, _ = glossary()
    stale = sorted(names - set(public_parameters()))
    assert not stale, f"ARCHITECTURE.md's glossary lists names no public parameter has any more: {stale}"


def test_renamed_parameters_are_in_the_glossary():
    names, aliases = glossary()
    renamed = [(where, func) for where, func in public_callables() if hasattr(func, "__renamed_arguments__")]
    assert renamed, "no public function uses renamed_arguments"
    for where, func in renamed:
        params = inspect.signature(func).parameters
        for old, new in func.__renamed_arguments__.items():
            assert new in params, f"{where}: {old} -> {new}"
            assert old not in params, f"{where}: {old} -> {new}"
            assert new in names, f"{where}: the glossary must list {new}"
            assert old in aliases, f"{where}: the glossary must list {old} as a deprecated alias"


def test_renamed_arguments_warns_and_forwards():
    @renamed_arguments(old="new")
    def func(*, new=1):
        """Doc."""
        return new

    assert func(new=2) == 2
    with pytest.warns(FutureWarning, match=r"func\(old=\.\.\.\)` is deprecated.*use `new=\.\.\.`"):
        assert func(old=3) == 3
    with pytest.raises(TypeError, match="both `old` and its new name `new`"):
        func(old=3, new=4)
    assert func.__doc__ == "Doc."
    assert list(inspect.signature(func).parameters) == ["new"]


# ------------------------------------------------------------------------------------ every alias, called for real
def renamed_in_api() -> list[tuple[str, str, str]]:
    """(where, old, new) of every deprecated keyword of the public API."""
    return sorted(
        (where, old, new)
        for where, func in public_callables()
        for old, new in getattr(func, "__renamed_arguments__", {}).items()
    )


@pytest.fixture(scope="module")
def slide():
    """A small slide with the predictions of an (untrained) model and two spots over it.

    The tables are under names other than the defaults (`pred`, `measured`), so that a keyword dropped on the way
    would show.
    """
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    sdata = ghist.datasets.synthetic(image_size=64, n_genes=4, seed=0)
    table = sdata.tables["table"]
    model = ghist.GHISTModel(list(table.var_names), list(table.obs["cell_type"].cat.categories), width=8)
    ghist.tl.predict(sdata, model, key_added="pred", progress=False)
    measured = table.copy()
    measured.X = measured.X[:, ::-1]  # other counts than `table`'s
    sdata.tables["measured"] = measured
    sdata.shapes["spots"] = ShapesModel.parse(
        np.array([[20.0, 20.0], [44.0, 40.0]]), geometry=0, radius=np.array([16.0, 16.0]),
        transformations={"global": Identity()},
    )  # fmt: skip
    return sdata, model


@pytest.fixture(scope="module")
def cohort():
    """Forty patients: follow-up, events and two features, one of them tied to the hazard."""
    import anndata as ad

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    time = rng.exponential(30.0 * np.exp(-x[:, 0]))
    obs = pd.DataFrame({"time": time, "event": rng.random(40) < 0.8}, index=[f"p{i}" for i in range(40)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=["f0", "f1"]))


def _xenium_with_two_images():
    """A Xenium sample with a second H&E (inverted), so that the default image is not the one asked for."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    sdata = ghist.datasets.synthetic_xenium(image_size=64, n_genes=4)
    he = sdata.images["he_image"]
    sdata.images["inverted"] = Image2DModel.parse(
        255 - he.data,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=get_transformation(he, get_all=True),
    )
    return sdata


def _saved(model, path):
    model.save(path, overwrite=True)
    return path


def _save_then_load(model):
    def call(**kwargs):
        model.save(overwrite=True, **kwargs)
        return ghist.GHISTModel.load(next(iter(kwargs.values())))

    return call


HAZARDS = {"hr": [2.0, 0.5], "ci_lower": [1.5, 0.3], "ci_upper": [2.5, 0.8], "p": [0.001, 0.02], "q": [0.002, 0.03]}

# (where, old keyword) -> (slide, cohort, tmp_path) -> (a call taking the keyword, the value it is given: not the
# default, so that the value is seen to arrive)
ALIAS_CASES = {
    ("tl.aggregate_to_spots", "table_key"): lambda s, c, t: (
        partial(ghist.tl.aggregate_to_spots, s[0], spots_key="spots", key_added="pseudo", overwrite=True),
        "pred",
    ),
    ("io.write_qupath", "table_key"): lambda s, c, t: (
        partial(ghist.io.write_qupath, s[0], t / "cells.geojson", genes="all", overwrite=True),
        "pred",
    ),
    ("pp.prepare_xenium", "he_key"): lambda s, c, t: (
        partial(ghist.pp.prepare_xenium, _xenium_with_two_images()),
        "inverted",
    ),
    ("GHISTModel.save", "dir_path"): lambda s, c, t: (_save_then_load(s[1]), t / "model"),
    ("GHISTModel.load", "dir_path"): lambda s, c, t: (ghist.GHISTModel.load, _saved(s[1], t / "model")),
    ("tl.predict", "region_key"): lambda s, c, t: (
        partial(ghist.tl.predict, s[0], s[1], key_added="in_spots", overwrite=True, progress=False),
        "spots",
    ),
    ("tl.evaluate", "true_key"): lambda s, c, t: (
        partial(ghist.tl.evaluate, s[0], pred_key="pred", n_svg=[2]),
        "measured",
    ),
    ("pl.expression", "true_key"): lambda s, c, t: (
        partial(ghist.pl.expression, s[0], list(s[0]["pred"].var_names[:2]), pred_key="pred", show=False),
        "measured",
    ),
    ("pl.cell_types", "true_key"): lambda s, c, t: (
        partial(ghist.pl.cell_types, s[0], pred_key="pred", cell_type_key="cell_type", show=False),
        "measured",
    ),
    ("pl.kaplan_meier", "split"): lambda s, c, t: (
        partial(ghist.pl.kaplan_meier, c, "f0", duration_key="time", event_key="event", show=False),
        0.25,
    ),
    ("pl.hazard_ratios", "alpha"): lambda s, c, t: (
        partial(ghist.pl.hazard_ratios, pd.DataFrame(HAZARDS, index=["f1", "f2"]), show=False),
        0.01,
    ),
    ("tl.survival", "standardize"): lambda s, c, t: (
        partial(ghist.tl.survival, c, duration_key="time", event_key="event", progress=False),
        False,
    ),
    ("datasets.synthetic", "he_transform"): lambda s, c, t: (
        partial(ghist.datasets.synthetic, image_size=32, n_genes=3, seed=1),
        "affine",
    ),
    ("datasets.synthetic", "he_scale"): lambda s, c, t: (
        partial(ghist.datasets.synthetic, image_size=32, n_genes=3, image_transform="scale", seed=1),
        2.0,
    ),
    ("pp.fit_segmenter", "learning_rate"): lambda s, c, t: (
        partial(ghist.pp.fit_segmenter, s[0], max_steps=1, batch_size=1, crop_size=32, widths=(8, 12), progress=False),
        0.01,
    ),
    ("pp.segment_nuclei", "n_workers"): lambda s, c, t: (
        partial(ghist.pp.segment_nuclei, s[0], key_added="segmented", chunk_size=64, overwrite=True, progress=False),
        2,
    ),
}


@pytest.mark.parametrize(("where", "old", "new"), renamed_in_api(), ids=lambda v: str(v))
def test_old_keyword_gives_the_same_result(where, old, new, slide, cohort, tmp_path):
    import matplotlib.pyplot as plt

    assert (where, old) in ALIAS_CASES, f"add a call of {where} to ALIAS_CASES, to test its alias `{old}`"
    call, value = ALIAS_CASES[where, old](slide, cohort, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new name: no warning
        expected = outcome(call(**{new: value}))
    plt.close("all")
    said = rf"`ghist\.{re.escape(where)}\({old}=\.\.\.\)` is deprecated .* use `{new}=\.\.\.`"
    with pytest.warns(FutureWarning, match=said):
        got = outcome(call(**{old: value}))
    plt.close("all")
    assert_same(got, expected, where)
    with pytest.raises(TypeError, match=rf"both `{old}` and its new name `{new}`"):
        call(**{old: value, new: value})


def test_model_path_may_be_positional(slide, tmp_path):
    model = slide[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.save(tmp_path / "m")
        loaded = ghist.GHISTModel.load(tmp_path / "m")
    assert_same(outcome(loaded), outcome(model), "GHISTModel.load")


def outcome(result):
    """What a call gave, as plain values: arrays and frames of tables, file bytes, the data a plot drew."""
    import anndata as ad
    import matplotlib.pyplot as plt
    from spatialdata import SpatialData
    from xarray import DataArray, DataTree

    from ghist._validation import scale0

    if isinstance(result, SpatialData):
        return {name: outcome(element) for _, name, element in result.gen_elements()}
    if isinstance(result, DataArray | DataTree):  # an image or labels
        return np.asarray(scale0(result))
    if isinstance(result, ad.AnnData):
        x = result.X.toarray() if hasattr(result.X, "toarray") else np.asarray(result.X)
        return {"X": x, "obs": result.obs, **{f"obsm/{k}": np.asarray(v) for k, v in result.obsm.items()}}
    if isinstance(result, ghist.GHISTModel):
        return {"genes": result.genes, **{k: v.numpy() for k, v in result.network.state_dict().items()}}
    if isinstance(result, ghist.pp.NucleusSegmenter):
        return {k: v.numpy() for k, v in result.net.state_dict().items()}
    if isinstance(result, Path):
        return result.read_bytes()
    if isinstance(result, np.ndarray) and result.dtype == object:  # an array of Axes
        result = result.flat[0]
    if isinstance(result, plt.Axes | plt.Figure):
        figure = result if isinstance(result, plt.Figure) else result.figure
        return [_drawn(ax) for ax in figure.axes]
    return result


def _drawn(ax) -> dict:
    legend = ax.get_legend()
    return {
        "text": [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()],
        "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
        "points": [np.asarray(c.get_offsets()) for c in ax.collections],
        "colours": [np.asarray(c.get_facecolors()) for c in ax.collections],
        "lines": [line.get_xydata() for line in ax.lines],
        "patches": [p.get_extents().bounds for p in ax.patches],
        "images": [np.asarray(im.get_array()) for im in ax.images],
    }


def assert_same(got, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(got, dict), where
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_same(g, e, f"{where}[{i}]")
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected, obj=where)
    elif isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(got, expected, err_msg=where)
    else:
        assert got == expected, where
