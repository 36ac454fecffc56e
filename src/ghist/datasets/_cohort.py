"""A synthetic cohort of H&E-only slides with survival driven by one planted cell-type proportion."""

from __future__ import annotations

import logging
import time as _time
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import (
    CELL_TYPE_KEY,
    COHORT_PROP_PREFIX,
    IMAGE_KEY,
    LABELS_KEY,
    SYNTHETIC_DURATION_KEY,
    SYNTHETIC_EVENT_KEY,
    SYNTHETIC_TRUE_PROP_PREFIX,
    TABLE_KEY,
    XENIUM_BREAST_CELL_TYPES,
)
from .._validation import check_int, check_number, check_seed
from ._synthetic import synthetic

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def synthetic_cohort(
    n_patients: int = 40,
    *,
    image_size: int = 448,
    causal_type: str = "Macrophage",
    hazard_ratio: float = 3.0,
    composition_sd: float = 0.7,
    median_survival: float = 40.0,
    follow_up: float = 200.0,
    pixel_size: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, SpatialData], pd.DataFrame]:
    """A cohort of H&E-only synthetic slides, one per patient, with survival driven by one cell-type proportion.

    Every patient gets a slide of :func:`ghist.datasets.synthetic` whose cell-type mix is shifted by random
    patient-specific weights (log-normal with standard deviation ``composition_sd``, passed as ``type_weights``),
    so that proportions differ between patients as they do between tumours. Only the H&E image and the nucleus
    labels are kept: there is no measured expression, as for a TCGA-like cohort.

    Survival times are exponential with a hazard that depends on one planted feature only: the true proportion of
    ``causal_type`` on the patient's slide, ``h = h0 * hazard_ratio ** z`` with ``z`` that proportion z-scored over
    the cohort (so ``hazard_ratio`` is per standard deviation) and ``h0`` giving a median survival of
    ``median_survival`` at the cohort mean. Patients are censored at a time uniform between a quarter of
    ``follow_up`` and ``follow_up`` (staggered accrual, administrative end of study).

    Parameters
    ----------
    n_patients
        Number of patients (slides).
    image_size
        Side of every slide, in pixels (labels and H&E on the same grid).
    causal_type
        Cell type whose proportion drives the hazard, one of
        :data:`ghist._constants.XENIUM_BREAST_CELL_TYPES`.
    hazard_ratio
        Hazard ratio per standard deviation of the causal proportion (> 0; 1 plants no effect).
    composition_sd
        Standard deviation of the patients' log type weights; 0 keeps the default mix (proportions then vary only
        with the random tissue layout).
    median_survival
        Median survival time of a patient with the cohort's mean causal proportion (same unit as ``time``,
        e.g. months).
    follow_up
        Longest follow-up; censoring times are uniform on ``[follow_up / 4, follow_up]``.
    pixel_size
        Microns per pixel of the slides.
    seed
        Random seed. Patient ``i``'s slide depends only on ``seed`` and ``i``, not on ``n_patients``.
    progress
        Show a progress bar over the slides.

    Returns
    -------
    ``(slides, clinical)``:

    - ``slides``: patient id -> :class:`spatialdata.SpatialData` with ``images["he"]`` and ``labels["nuclei"]``
      only;
    - ``clinical``: :class:`pandas.DataFrame` indexed by patient id (index name ``"patient"``) with ``time``
      (follow-up), ``event`` (1 = death observed, 0 = censored), ``n_cells`` (labelled nuclei) and the true
      cell-type proportions of each slide in ``true_prop:<type>`` (the ground truth a prediction can be compared
      with). ``clinical.attrs`` holds ``causal_feature`` (``"prop:<causal_type>"``, the name
      :func:`ghist.tl.predict_cohort` gives that feature), ``hazard_ratio`` and ``seed``.

    Examples
    --------
    >>> import ghist
    >>> slides, clinical = ghist.datasets.synthetic_cohort(4, image_size=128, progress=False)
    >>> sorted(slides)
    ['P000', 'P001', 'P002', 'P003']
    >>> clinical.attrs["causal_feature"]
    'prop:Macrophage'

    """
    types = list(XENIUM_BREAST_CELL_TYPES)
    check_int("n_patients", n_patients, 2)
    if causal_type not in types:
        raise ValueError(f"`causal_type` must be one of {types}, got {causal_type!r}.")
    check_number("hazard_ratio", hazard_ratio)
    check_number("composition_sd", composition_sd, positive=False)
    for name, value in (("median_survival", median_survival), ("follow_up", follow_up), ("pixel_size", pixel_size)):
        check_number(name, value)
    check_seed(seed)

    from spatialdata import SpatialData
    from tqdm.auto import tqdm

    start = _time.perf_counter()
    slide_root, survival_root = np.random.SeedSequence(int(seed)).spawn(2)
    ids = [f"P{i:03d}" for i in range(n_patients)]
    slides: dict[str, SpatialData] = {}
    props = np.zeros((n_patients, len(types)))
    n_cells = np.zeros(n_patients, dtype=np.int64)
    for i, (pid, ss) in enumerate(
        zip(tqdm(ids, desc="ghist.datasets.synthetic_cohort", disable=not progress), slide_root.spawn(n_patients))
    ):
        rng = np.random.default_rng(ss)
        weights = np.exp(rng.normal(0.0, composition_sd, len(types)))
        sdata = synthetic(
            image_size=image_size,
            n_genes=1,  # the measured table is dropped; its genes do not change the slide
            type_weights=dict(zip(types, weights.tolist())),
            pixel_size=pixel_size,
            seed=int(rng.integers(2**31 - 1)),
        )
        cell_type = sdata.tables[TABLE_KEY].obs[CELL_TYPE_KEY]
        n_cells[i] = len(cell_type)
        props[i] = cell_type.value_counts(normalize=True).reindex(types, fill_value=0.0).to_numpy()
        slides[pid] = SpatialData(
            images={IMAGE_KEY: sdata.images[IMAGE_KEY]}, labels={LABELS_KEY: sdata.labels[LABELS_KEY]}
        )

    x = props[:, types.index(causal_type)]
    z = (x - x.mean()) / x.std(ddof=1) if x.std() > 0 else np.zeros_like(x)
    rng = np.random.default_rng(survival_root)
    rate = np.log(2.0) / median_survival * np.exp(np.log(hazard_ratio) * z)
    event_time = rng.exponential(1.0 / rate)
    censor_time = rng.uniform(follow_up / 4, follow_up, n_patients)
    clinical = pd.DataFrame(
        {
            SYNTHETIC_DURATION_KEY: np.maximum(np.round(np.minimum(event_time, censor_time), 2), 0.01),
            SYNTHETIC_EVENT_KEY: (event_time <= censor_time).astype(np.int64),
            "n_cells": n_cells,
            **{f"{SYNTHETIC_TRUE_PROP_PREFIX}:{t}": props[:, j] for j, t in enumerate(types)},
        },
        index=pd.Index(ids, name="patient"),
    )
    clinical.attrs.update(
        {"causal_feature": f"{COHORT_PROP_PREFIX}{causal_type}", "hazard_ratio": float(hazard_ratio), "seed": int(seed)}
    )
    logger.info(
        "Synthetic cohort: %d patients, %d events, causal feature %r (sd %.3f), in %.1f s",
        n_patients,
        int(clinical[SYNTHETIC_EVENT_KEY].sum()),
        f"{COHORT_PROP_PREFIX}{causal_type}",
        float(x.std(ddof=1)),
        _time.perf_counter() - start,
    )
    return slides, clinical
