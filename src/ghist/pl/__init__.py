"""ghist.pl."""

from ._evaluation import gene_correlation
from ._expression import cell_types, expression
from ._survival import hazard_ratios, kaplan_meier

__all__ = ["cell_types", "expression", "gene_correlation", "hazard_ratios", "kaplan_meier"]
