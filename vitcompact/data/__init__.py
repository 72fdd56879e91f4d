"""Data sources (offline) and `load_data`, which turns one into train/val/test loaders."""

from .bundle import DataBundle, ImageDataset, load_data, load_data_for
from .sources import DATA_SOURCES, DataSource, RawData, read_idx

__all__ = ["DataBundle", "ImageDataset", "load_data", "load_data_for", "DATA_SOURCES", "DataSource", "RawData", "read_idx"]
