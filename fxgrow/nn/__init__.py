"""Producers: modules inserted into weight chains. State plus pure tensor math only."""
from .base import Producer

__all__ = ["Producer"]
