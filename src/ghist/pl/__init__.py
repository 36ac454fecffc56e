"""ghist.pl."""

from ._composition import composition
from ._evaluation import gene_correlation
from ._expression import cell_types, expression
from ._survival import hazard_ratios, kaplan_meier

__all__ = ["cell_types", "composition", "expression", "gene_correlation", "hazard_ratios", "kaplan_meier"]
