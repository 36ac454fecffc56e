"""ghist.tl."""

from ._evaluate import evaluate
from ._fit import fit
from ._predict import predict
from ._survival import survival

__all__ = ["evaluate", "fit", "predict", "survival"]
