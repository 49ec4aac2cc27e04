"""`model.example_input`: a shape (one float tensor, as before) or a tensor mapping with a
dtype and, for token ids, the id range."""
from __future__ import annotations

import pytest
import torch

from fxgrow import api
from fxgrow.errors import SpecError
from fxgrow.specs.root import parse_spec


def test_token_ids_are_drawn_in_their_range_from_the_seed():
    spec = parse_spec({"model": {"example_input": {"shape": [2, 16], "dtype": "int64", "high": 300, "low": 3}},
                       "train": {"seed": 4}})
    x = api.example_input(spec)
    assert x.dtype == torch.int64 and x.shape == (2, 16) and 3 <= int(x.min()) and int(x.max()) < 300
    assert torch.equal(x, torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(4)))
    assert api.example_input(spec, batch=5).shape == (5, 16)
    assert spec.model.with_example_shape([1, 8]).example.model_dump() == {"shape": [1, 8], "dtype": "int64",
                                                                          "low": 3, "high": 300}


def test_the_shape_form_is_unchanged():
    plain = parse_spec({"model": {"example_input": [1, 3, 4, 4]}, "train": {"seed": 4}})
    assert plain.model.example_input == [1, 3, 4, 4]  # stored as written
    assert torch.equal(api.example_input(plain), torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(4)))
    assert plain.model.with_example_shape([2, 3]).example_input == [2, 3]
    half = parse_spec({"model": {"example_input": {"shape": [1, 4], "dtype": "bfloat16"}}})
    assert api.example_input(half).dtype == torch.bfloat16
    assert parse_spec(plain.model_dump(mode="json")) == plain


@pytest.mark.parametrize("example, location, message", [
    ({"shape": [1, 4], "dtype": "int64"}, "model.example_input.high", "int64 ids need a range"),
    ({"shape": [1, 4], "high": 3}, "model.example_input.high", "a range applies to integer dtypes, not float32"),
    ({"shape": [1, 4], "low": 1}, "model.example_input.low", "a range applies to integer dtypes"),
    ({"shape": [1, 4], "dtype": "int32", "low": 5, "high": 5}, "model.example_input.high", "more than low (5)"),
    ({"shape": [1, 0], "dtype": "int64", "high": 4}, "model.example_input.shape.1", "greater than or equal to 1"),
    ({"shape": [1, 4], "dtype": "int8", "high": 4}, "model.example_input.dtype", "'int64'"),
    ({"dtype": "int64", "high": 4}, "model.example_input.shape", "Field required"),
    ([1, 0], "model.example_input.1", "greater than or equal to 1"),
    ([], "model.example_input", "at least 1 item"),
])
def test_errors_name_the_field(example, location, message):
    with pytest.raises(SpecError) as info:
        parse_spec({"model": {"example_input": example}})
    assert [(loc, message in msg) for loc, msg in info.value.errors] == [(location, True)], info.value.errors


# --- several inputs, keyword inputs, and the Python API taking them directly --------------

class TwoInputs(torch.nn.Module):
    """An image and token ids (positional), an optional mask (keyword)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.emb = torch.nn.Embedding(10, 8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, image, ids, mask=None):
        tokens = self.emb(ids)
        if mask is not None:
            tokens = tokens * mask.unsqueeze(-1)
        return self.fc(self.conv(image).mean((2, 3)) + tokens.mean(1))


SEVERAL = {"example_input": [[1, 3, 8, 8], {"shape": [1, 5], "dtype": "int64", "high": 10}],
           "example_kwargs": {"mask": {"shape": [1, 5], "dtype": "int64", "high": 2}}}


def test_several_and_keyword_inputs_are_drawn_in_order_from_the_seed():
    from fxgrow.analysis.shapes import Inputs
    spec = parse_spec({"model": SEVERAL, "train": {"seed": 2}})
    inputs = api.example_input(spec)
    assert isinstance(inputs, Inputs) and list(inputs.kwargs) == ["mask"]
    image, ids = inputs.args
    g = torch.Generator().manual_seed(2)
    assert torch.equal(image, torch.randn(1, 3, 8, 8, generator=g))
    assert torch.equal(ids, torch.randint(0, 10, (1, 5), generator=g, dtype=torch.int64))
    assert torch.equal(inputs.kwargs["mask"], torch.randint(0, 2, (1, 5), generator=g, dtype=torch.int64))
    assert api.example_input(spec, batch=3).args[1].shape == (3, 5)
    assert spec.model.with_example_shape([1, 3, 16, 16]).examples[0].shape == [1, 3, 16, 16]
    assert parse_spec(spec.model_dump(mode="json")) == spec


def test_a_rewrite_and_its_analyses_take_several_inputs():
    from fxgrow.analysis import forward_flops, propagate_shapes
    from fxgrow.passes import compose
    from fxgrow.passes.compander import CompanderPass
    from fxgrow.passes.prune_regrow import PruneRegrowPass
    from fxgrow.trace import trace

    torch.manual_seed(0)
    model = TwoInputs()
    spec = parse_spec({"model": SEVERAL, "passes": [{"kind": "compander", "a": 4.0}]})
    inputs = api.example_input(spec)
    gm = api.compile_spec(spec, model).graph_module
    torch.testing.assert_close(gm(*inputs.args, **inputs.kwargs), model(*inputs.args, **inputs.kwargs))
    assert forward_flops(model, inputs) == forward_flops(gm, inputs) > 0
    shaped = propagate_shapes(trace(model), inputs)
    assert [tuple(n.meta["tensor_meta"].shape) for n in shaped.graph.nodes if n.op == "placeholder"] == \
        [(1, 3, 8, 8), (1, 5), (1, 5)]
    # the Python API takes example inputs directly: a tuple of positional inputs, or keywords
    # (FX traced the `mask is not None` branch: the graph takes a mask)
    image, ids, mask = *inputs.args, inputs.kwargs["mask"]
    filters = compose(CompanderPass(a=4.0), PruneRegrowPass(granularity="filter", final_sparsity=0.5))
    result = filters(model, example_input=(image, ids, mask))
    torch.testing.assert_close(result.graph_module(image, ids, mask), model(image, ids, mask))
    api.compile_spec(spec, model, example={"image": image, "ids": ids, "mask": mask})


@pytest.mark.parametrize("example, words", [
    ({"picture": torch.zeros(1, 3, 8, 8)}, "the model's input 'image' has no example (model.example_kwargs)"),
    ((torch.zeros(1, 3, 8, 8), torch.zeros(1, 5, dtype=torch.int64), torch.zeros(1, 5), torch.zeros(1)),
     "the model takes 3 input(s), the example gives 4 (model.example_input)"),
])
def test_inputs_that_do_not_fit_are_one_clear_error(example, words):
    from fxgrow.errors import FxgrowError
    from fxgrow.passes.prune_regrow import PruneRegrowPass
    with pytest.raises(FxgrowError, match=words.replace("(", r"\(").replace(")", r"\)")):
        PruneRegrowPass(granularity="filter")(TwoInputs(), example_input=example)
