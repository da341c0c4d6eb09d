"""Calibration and evaluation data."""
from casp.data.text import (BUNDLED, HUB_DATASETS, consecutive_windows, load_documents,
                            random_windows, tokenize_documents)

__all__ = ["BUNDLED", "HUB_DATASETS", "consecutive_windows", "load_documents", "random_windows",
           "tokenize_documents"]
