"""The common training loop: one loop for every rewritten model (see loop.py)."""
from .callbacks import Callback, ModelChange, TrainContext
from .data import Data, DataError, load_data
from .loop import NonFiniteLoss, NonFiniteState, Trainer

__all__ = ["Callback", "ModelChange", "TrainContext", "Trainer", "NonFiniteLoss", "NonFiniteState", "Data", "DataError",
           "load_data"]
