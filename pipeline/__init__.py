"""Data pipeline: record files, decode engines, the augment/normalize/mix stages, ``Loader``."""
from .convert import convert
from .errors import DataError, UserError
from .loader import Batch, Loader
from .records import RecordFile, read_classes
from .stages import IMAGENET_MEAN, IMAGENET_STD, Stages

__all__ = ["Loader", "Batch", "convert", "RecordFile", "read_classes", "Stages", "DataError",
           "UserError", "IMAGENET_MEAN", "IMAGENET_STD"]
