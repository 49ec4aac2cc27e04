"""Analyses the passes share: shapes, channel coupling, cost."""
from .cost import Cost, count_params, forward_flops, measure
from .coupling import ChannelGroup, ChannelUse, channel_groups, coupling_graph
from .shapes import output_shape, propagate_shapes, propagate_shapes_and_flops

__all__ = ["ChannelGroup", "ChannelUse", "Cost", "channel_groups", "count_params", "coupling_graph",
           "forward_flops", "measure", "output_shape", "propagate_shapes", "propagate_shapes_and_flops"]
