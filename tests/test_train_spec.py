"""The `train:` section: defaults, shorthands and the errors a user sees."""
from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from fxgrow.specs.train import AdamWSpec, SGDSpec, TrainSpec


def test_empty_section_is_a_digits_sgd_cosine_run():
    spec = TrainSpec()
    assert (spec.data.name, spec.optimizer.name, spec.schedule.name) == ("digits", "sgd", "cosine")


def test_yaml_round_trip_and_optimizer_defaults():
    text = """
    data: {name: cifar10, root: /data, augment: crop_flip}
    optimizer: {name: adamw}
    schedule: {name: multistep, milestones: [30, 60]}
    """
    spec = TrainSpec.model_validate(yaml.safe_load(text))
    assert isinstance(spec.optimizer, AdamWSpec) and spec.optimizer.lr == 1e-3
    assert TrainSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert isinstance(TrainSpec(optimizer={"lr": 0.2}).optimizer, SGDSpec)  # name defaults to sgd


@pytest.mark.parametrize("fields, location, message", [
    ({"epochs": 3, "steps": 10}, (), "epochs or steps, not both"),
    ({"optimizer": {"momentum": 0, "nesterov": True}}, ("optimizer", "sgd"), "nesterov needs momentum"),
    ({"optimizer": {"name": "sgd", "betas": [0.9, 0.99]}}, ("optimizer", "sgd", "betas"), "Extra inputs"),
    ({"schedule": {"milestones": [3]}}, ("schedule",), "milestones only apply to multistep"),
    ({"schedule": {"name": "multistep", "milestones": [5, 2]}}, ("schedule",), "increasing"),
    ({"data": "mnist"}, ("data",), "does not match any of the expected tags"),
    ({"data": {"name": "cifar10"}}, ("data", "cifar10", "root"), "Field required"),
    ({"data": "python: not a reference"}, ("data", "python", "entry"), "should match pattern"),
    ({"device": "gpu"}, ("device",), "should match pattern"),
    ({"batch_size": 0}, ("batch_size",), "greater than or equal to 1"),
])
def test_errors_name_the_field(fields, location, message):
    with pytest.raises(ValidationError) as info:
        TrainSpec(**fields)
    error = info.value.errors()[0]
    assert error["loc"] == location and message in error["msg"]
