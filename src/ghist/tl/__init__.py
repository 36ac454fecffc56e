"""ghist.tl."""

from ._cohort import predict_cohort
from ._evaluate import evaluate
from ._evaluate_segmentation import evaluate_segmentation
from ._fit import fit
from ._predict import predict
from ._spots import aggregate_to_spots
from ._survival import survival

__all__ = ["aggregate_to_spots", "evaluate", "evaluate_segmentation", "fit", "predict", "predict_cohort", "survival"]
