"""Analyses the passes share: shapes, channel coupling, cost."""
from .cost import Cost, count_params, forward_flops, measure
from .shapes import output_shape, propagate_shapes, propagate_shapes_and_flops

__all__ = ["Cost", "count_params", "forward_flops", "measure", "output_shape", "propagate_shapes",
           "propagate_shapes_and_flops"]
