"""fxgrow: a declarative graph-rewriting compiler over torch.fx.

    import fxgrow
    spec = fxgrow.load_spec("examples/compander.yaml")
    result = fxgrow.compile_spec(spec, model)       # .graph_module, .callbacks
    plain = fxgrow.fold(result.graph_module)

or compose passes directly: `fxgrow.compose(CompanderPass(a=0.7), ...)(model)`. In a training
loop of your own (or Lightning's, or the HF Trainer's: `fxgrow.integrations`):
`session = fxgrow.Session(spec, model, total_steps=T)` (see `fxgrow/session.py`).
"""
from .api import build_model, compile_spec, example_input, passes_from_spec, pipeline, run
from .errors import FxgrowError, ModelLoadError, PassError, SpecError, TraceError
from .fold import fold
from .loader import load_model
from .passes import PASS_REGISTRY, Pass, Pipeline, compose
from .session import Session
from .specs.root import Spec, load_spec, parse_spec, parse_spec_text
from .trace import trace

__version__ = "0.1.0"

__all__ = ["FxgrowError", "ModelLoadError", "PASS_REGISTRY", "Pass", "PassError", "Pipeline", "Spec",
           "Session", "SpecError", "TraceError", "build_model", "compile_spec", "compose", "example_input", "fold",
           "load_model", "load_spec", "parse_spec", "parse_spec_text", "passes_from_spec", "pipeline",
           "run", "trace"]
