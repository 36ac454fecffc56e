"""Procedural breast-cancer-like tissue for :func:`ghist.datasets.synthetic`.

The tissue is built in continuous micron coordinates, in four steps that each have their own module:

1. :func:`build_tissue` (``_layout``, ``_cells``): region fields (tumour nests, stroma, lymphoid aggregates, ducts,
   vessels, fat) and proposed nuclei with a type distribution that depends on where they lie;
2. :func:`place_nuclei` (``_placement``): each proposal gets its type and a type-specific shape (``_nuclei``) and
   is kept if it fits without touching its neighbours on the labels pixel grid;
3. :func:`paint_background` (``_stain``): hematoxylin, eosin and red blood cells outside the nuclei;
4. :func:`render_he` (``_stain``): the H&E image rasterised from the same continuous description through any
   pixel grid (identity, scaled or affine, see ``_frame``), so that the labels and the image agree whatever
   transformation links them.

Every step draws from its own random generator in a fixed order, so a seed always gives the same slide.

Pixel convention (spatialdata's): pixel ``(row i, col j)`` covers ``[j, j + 1) x [i, i + 1)`` of its intrinsic
coordinate system, its centre is ``(j + 0.5, i + 0.5)``.
"""

from ._frame import Frame
from ._layout import build_tissue
from ._placement import place_nuclei
from ._stain import paint_background, render_he

__all__ = ["Frame", "build_tissue", "paint_background", "place_nuclei", "render_he"]
