"""The pruning core: masks, magnitude pruning, criteria, selection and regrouping."""

from .criteria import CRITERIA, DATA_DRIVEN, ScoreContext, score_units
from .magnitude import magnitude_prune
from ..masks import PruneMasks
from .regroup import TARGETS, RegroupConfig, regroup, structured_prune
from .selection import SELECTION_MODES, keep_count, select_units
from ..structure import BlockStructure, Structure

__all__ = [
    "CRITERIA", "DATA_DRIVEN", "ScoreContext", "score_units", "magnitude_prune", "PruneMasks",
    "TARGETS", "RegroupConfig", "regroup", "structured_prune", "SELECTION_MODES", "keep_count", "select_units",
    "BlockStructure", "Structure",
]
