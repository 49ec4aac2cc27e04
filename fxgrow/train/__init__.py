"""The common training loop: one loop for every rewritten model (see loop.py)."""
from .callbacks import Callback, ModelChange, TrainContext, replay_structure
from .data import Data, DataError, load_data
from .loop import NonFiniteLoss, Trainer

__all__ = ["Callback", "ModelChange", "TrainContext", "Trainer", "NonFiniteLoss", "Data", "DataError", "load_data",
           "replay_structure"]
