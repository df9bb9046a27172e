"""Detection datasets (one canonical table, every common format), chips, YOLO training and inference."""

from detection.dataset import (
    DataYaml,
    DetectionDataset,
    canonical_split,
    detect_format,
    image_size,
    read_data_yaml,
    read_dataset,
    save_data_yaml,
    write_dataset,
)
from detection.errors import DataError
from detection.geo import Georef, map_to_pixel_boxes, pixel_to_map_boxes, read_georef

__all__ = [
    "DataError", "DataYaml", "DetectionDataset", "canonical_split", "Georef", "detect_format", "image_size", "map_to_pixel_boxes",
    "pixel_to_map_boxes", "read_data_yaml", "read_dataset", "read_georef", "save_data_yaml", "write_dataset",
]
