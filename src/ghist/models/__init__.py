"""Trained GHIST models shipped with ghist: list them, read their cards, load them.

:func:`ghist.tl.predict` and :func:`ghist.tl.predict_cohort` use :data:`DEFAULT_MODEL` when no model is given, and
accept a registered name (or a saved model's folder) as ``model=``.
"""

from __future__ import annotations

from .._bundled_models import DEFAULT_MODEL
from ._api import available, card, load

__all__ = ["DEFAULT_MODEL", "available", "card", "load"]
