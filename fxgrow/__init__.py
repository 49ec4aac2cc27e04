"""fxgrow: a declarative graph-rewriting compiler over torch.fx."""
__version__ = "0.1.0"
