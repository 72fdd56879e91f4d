"""Data sources (offline) and `load_data`, which turns one into train/val/test loaders."""

from .bundle import AUGMENTATIONS, DataBundle, ImageDataset, TransformDataset, load_data, load_data_for, open_source
from .samples import FileSamples, Samples, TensorSamples
from .sources import DATA_SOURCES, DataSource, RawData, read_idx

__all__ = ["AUGMENTATIONS", "DataBundle", "ImageDataset", "TransformDataset", "load_data", "load_data_for",
           "open_source", "FileSamples", "Samples", "TensorSamples", "DATA_SOURCES", "DataSource", "RawData",
           "read_idx"]
