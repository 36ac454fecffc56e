"""Every default element key, column and ``uns`` name used by ghist, and the names it writes into files, once."""

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
XENIUM_CELL_ID_KEY = "xenium_cell_id"  # pp.prepare_xenium: where the prepared table keeps the string cell ids
SPATIAL_MICRONS_KEY = "spatial_microns"  # pp.prepare_xenium: cell centroids in µm, beside ``obsm["spatial"]``
SPOT_ID_KEY = "spot_id"  # instance key of the spot table tl.aggregate_to_spots makes without `spots_table_key`

# Cohort tables (AnnData of slides x features).
COHORT_UNS_KEY = "ghist_cohort"  # tl.predict_cohort's record in ``uns``
COHORT_PROP_PREFIX = "prop:"  # tl.predict_cohort's features ``prop:<type>``: share of a slide's cells of that type
SYNTHETIC_UNS_KEY = "synthetic"  # what datasets.synthetic / synthetic_reference planted, in ``uns``
SYNTHETIC_DURATION_KEY = "time"  # datasets.synthetic_cohort's clinical columns
SYNTHETIC_EVENT_KEY = "event"
SYNTHETIC_TRUE_PROP_PREFIX = "true_prop"  # planted proportions: ``true_prop:<type>``

# Names of other tools' data that ghist reads.
XENIUM_HE_KEY = "he_image"  # the name spatialdata-io gives the aligned H&E ("*he_image.ome.tif")

# Names ghist gives inside the stores, attributes and files it writes.
WSI_ATTRS_KEY = "ghist_wsi"  # ``sdata.attrs`` entry describing the slide file (io.read_wsi)
SLIDE_ATTRS_KEY = "ghist_slide"  # a slide store's record of its slide file (io.open_slide_store)
SCRATCH_PREFIX = ".ghist-write-"  # scratch folders of the element writer inside a store
CHECKPOINT_PREFIX = ".ghist-segment-"  # segment_nuclei's block checkpoints inside a store
CKPT_PIXEL_SIZE_KEY = "ghist_pixel_size"  # where checkpoints of `fit` record the pixel size they were trained at
UNCERTAINTY_HEAD_PREFIX = "uncertainty_head."  # the variance head's tensors in a saved model's weights

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
