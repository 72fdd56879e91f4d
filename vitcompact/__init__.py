"""vitcompact: prune ViT heads and MLP neurons, build the smaller model, export it, prove the speed-up."""

__version__ = "0.1.0"

from . import _timm  # noqa: F401  (first, so that timm is imported without wandb)
from .accounting import Count, count
from .artifact import create_model, is_compact, load, save
from .compaction import CompactInfo, compact, compact_info
from .errors import (ArtifactError, BackendUnavailableError, ConfigError, DataError, MaskError,
                     UnsupportedModelError, VitCompactError)
from .models import PRESETS, input_size, vit_layout
from .pruning import CRITERIA, PruneMasks, RegroupConfig, ScoreContext, Structure, magnitude_prune, regroup
from .data import DATA_SOURCES, DataBundle, load_data, load_data_for, open_source
from .pruning.loop import PruneConfig, PruneResult, prune
from .training import TrainConfig, TrainResult, evaluate, train
from .starting_point import model_and_data

__all__ = [
    "__version__", "Count", "count", "is_compact", "load", "save", "compact", "CompactInfo", "compact_info",
    "ArtifactError", "BackendUnavailableError", "ConfigError", "DataError", "MaskError",
    "UnsupportedModelError", "VitCompactError", "PRESETS", "create_model", "input_size", "vit_layout",
    "CRITERIA", "PruneMasks", "RegroupConfig", "ScoreContext", "Structure", "magnitude_prune", "regroup",
    "DATA_SOURCES", "DataBundle", "load_data", "load_data_for", "open_source", "model_and_data", "PruneConfig", "PruneResult", "prune",
    "TrainConfig", "TrainResult", "evaluate", "train",
]
