"""Data pipeline: record files, decode engines, the augment/normalize/mix stages, ``Loader``."""
from .augment import PerSample
from .convert import convert
from tricks.errors import DataError, OptionError, UserError
from .loader import Batch, Loader, LoaderClosed
from .options import (IMAGENET_MEAN, IMAGENET_STD, CenterCrop, Engine, Output, PadCrop,
                      RandomResizedCrop, Sampling)
from .records import RecordFile, read_classes
from .stages import Stages

__all__ = ["Loader", "Batch", "LoaderClosed", "Sampling", "Output", "Engine",
           "RandomResizedCrop", "CenterCrop", "PadCrop", "PerSample", "convert", "RecordFile",
           "read_classes", "Stages", "DataError", "OptionError", "UserError", "IMAGENET_MEAN",
           "IMAGENET_STD"]
