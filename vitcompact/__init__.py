"""vitcompact: prune ViT heads and MLP neurons, build the smaller model, export it, prove the speed-up."""

from .version import __version__
from . import _timm  # noqa: F401  (first, so that timm is imported without wandb)

# Models: one door for names and checkpoints, one for artifacts; one record on a model.
from .creation import create_model
from .artifact import load, save
from .models import PRESETS, BlockShape, ModelRecord, get_record, input_size, is_compact, vit_layout
from .models.token_merge import TokenMergeConfig, merge_tokens

# Data and training.
from .data import DATA_SOURCES, DataBundle, load_data, load_data_for, open_source
from .training import TrainConfig, TrainResult, evaluate, train
from .starting_point import model_and_data

# Pruning: masks and structure, criteria and selection, one config per method.
from .masks import PruneMasks
from .structure import Structure
from .pruning import CRITERIA, RegroupConfig, ScoreContext, magnitude_prune, regroup
from .pruning.configs import (OneShotConfig, PruneConfig, RefillConfig, RefitConfig, RSSTConfig, RunFolder,
                              prune_config)
from .pruning.loop import PruneResult, prune

# Compaction and accounting.
from .compaction import compact
from .accounting import Count, count

from .errors import (ArtifactError, BackendUnavailableError, ConfigError, DataError, MaskError,
                     UnsupportedModelError, VitCompactError)

__all__ = [
    "__version__",
    # models
    "create_model", "load", "save", "PRESETS", "BlockShape", "ModelRecord", "get_record", "input_size",
    "is_compact", "vit_layout", "TokenMergeConfig", "merge_tokens",
    # data and training
    "DATA_SOURCES", "DataBundle", "load_data", "load_data_for", "open_source", "TrainConfig", "TrainResult",
    "evaluate", "train", "model_and_data",
    # pruning
    "PruneMasks", "Structure", "CRITERIA", "RegroupConfig", "ScoreContext", "magnitude_prune", "regroup",
    "PruneConfig", "OneShotConfig", "RSSTConfig", "RefillConfig", "RefitConfig", "RunFolder", "prune_config",
    "PruneResult", "prune",
    # compaction and accounting
    "compact", "Count", "count",
    # errors
    "ArtifactError", "BackendUnavailableError", "ConfigError", "DataError", "MaskError", "UnsupportedModelError",
    "VitCompactError",
]
