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
