"""Every default element key, column and ``uns`` name used by ghist, written once."""

from __future__ import annotations

# Default SpatialData element keys (the data contract).
IMAGE_KEY = "he"
LABELS_KEY = "nuclei"
TABLE_KEY = "table"
PRED_KEY = "ghist"
SPOTS_KEY = "spots"
TISSUE_KEY = "tissue"  # tissue polygons of pp.detect_tissue

# Table columns.
REGION_KEY = "region"
INSTANCE_KEY = "cell_id"
CELL_TYPE_KEY = "cell_type"
SPATIAL_KEY = "spatial"
PRED_CELL_TYPE_KEY = "ghist_cell_type"
PRED_CELL_TYPE_SCORE_KEY = "ghist_cell_type_score"  # types of models without cell types, from the reference
PRED_PROBA_KEY = "ghist_cell_type_proba"
PRED_COMPOSITION_KEY = "ghist_composition"
PRED_STD_LAYER = "ghist_std"  # per-cell, per-gene predictive standard deviation (log1p scale)
PRED_ENTROPY_KEY = "ghist_cell_type_entropy"  # entropy (nats) of the refined cell-type probabilities
COHORT_SE_LAYER = "ghist_se"  # standard error of each per-slide feature (tl.predict_cohort)
UNS_KEY = "ghist"

# Coordinate systems.
GLOBAL_CS = "global"
MICRONS_CS = "microns"

# Network target scale: expression is learnt as EXPR_SCALE * log1p(counts).
EXPR_SCALE = 5.0

# Cell types of the Xenium breast panel shipped with ghist (10x Genomics, CC BY 4.0).
XENIUM_BREAST_CELL_TYPES = (
    "B",
    "Myeloid",
    "Endothelial",
    "Fibroblast",
    "Macrophage",
    "Malignant",
    "Epithelial",
    "Plasma",
    "T",
)
