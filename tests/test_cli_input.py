"""Bad command-line input and model files that do not fit the data: a clear error before
any work starts (or it just works), never a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cli_runs import MLP, apply_run, cli

SPEC = "model: {example_input: [1, 1, 8, 8]}\ntrain: {data: digits, steps: 2, batch_size: 32, progress: none}\n"

BAD_MODELS = '''
import torch
from torch import nn


class Pooled(nn.Module):  # averages over the batch: one row of logits whatever the batch
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)).mean(0, keepdim=True)


def pooled():
    return Pooled()


def for_cifar():  # built for 3x32x32 images, given 1x8x8 digits
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def five_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return apply_run(tmp_path_factory.mktemp("cli_input"), SPEC)


def assert_clear(result, code, *words):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for w in words:
        assert w in result.output, result.output


@pytest.mark.parametrize("builder, shape, words", [
    ("pooled", [1, 1, 8, 8], ["bad_models.py:pooled", "returns shape [1, 10] for a batch of shape [2, 1, 8, 8]"]),
    ("for_cifar", [1, 3, 32, 32], ["bad_models.py:for_cifar", "batch of shape [2, 1, 8, 8]", "train.data: digits",
                                   "layer '1' (Linear)", "mat1 and mat2 shapes cannot be multiplied"]),
    ("five_classes", [1, 1, 8, 8], ["5 logits", "10 classes"]),
])
def test_a_model_that_does_not_fit_the_data_is_named_with_its_layer(tmp_path, builder, shape, words):
    (tmp_path / "bad_models.py").write_text(BAD_MODELS)
    (tmp_path / "spec.yaml").write_text(SPEC.replace("[1, 1, 8, 8]", str(shape)))
    result = cli("apply", tmp_path / "spec.yaml", f"{tmp_path / 'bad_models.py'}:{builder}", "--out", tmp_path / "r")
    assert_clear(result, 1, *words)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_an_out_path_with_markup_is_printed_as_is(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    out = tmp_path / "runs [/b] [bold]x"
    result = cli("apply", tmp_path / "spec.yaml", MLP, "--out", out)
    assert_clear(result, 0, str(out))
    assert (out / "report.json").is_file()


def test_unwritable_outputs_are_refused_before_any_work(run, tmp_path):
    assert_clear(cli("schema", "-o", "/nonexistent/x.json"), 1, "/nonexistent", "no such folder")
    assert_clear(cli("fold", run, "-o", "/nonexistent/x.pt"), 1, "/nonexistent", "no such folder")
    assert_clear(cli("extract", run, "--width", "1", "-o", "/nonexistent/x.pt"), 1, "no such folder")
    assert_clear(cli("inspect", MLP, "--format", "dot", "-o", "/nonexistent/g.dot"), 1, "no such folder")
    assert_clear(cli("fold", run, "-o", tmp_path), 1, "is a folder")


def test_eval_options_are_checked(run):
    result = cli("eval", run, "--batch-size", "0")
    assert result.exit_code == 2 and "batch-size" in result.output and "Traceback" not in result.output
    assert_clear(cli("eval", run, "--device", "bogus"), 1, "--device", "'bogus'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device_is_refused_before_any_work(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC.replace("progress: none", "progress: none, device: cuda"))
    out = tmp_path / "r"
    assert_clear(cli("apply", tmp_path / "spec.yaml", MLP, "--out", out), 1, "train.device", "cuda",
                 "no CUDA device")
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--seed", "-1"], ["--seed", "train.seed"]),
    (["--seed", str(2 ** 40)], ["--seed", "train.seed"]),
])
def test_overrides_are_validated_like_the_spec(tmp_path, args, words):
    (tmp_path / "spec.yaml").write_text(SPEC)
    result = cli("apply", tmp_path / "spec.yaml", MLP, "--out", tmp_path / "r", *args)
    assert_clear(result, 2, *words)


def test_a_huge_input_shape_is_refused(tmp_path):
    assert_clear(cli("inspect", MLP, "--input-shape", "1,3,100000,100000"), 2, "--input-shape", "model.example_input")


@pytest.mark.parametrize("spec_text", ["", "passes:\n  - kind: compander\n"])
def test_an_example_input_that_does_not_fit_names_the_layer(tmp_path, spec_text):
    args = [write_spec(tmp_path, "model: {example_input: [1, 3, 8, 8]}\n" + spec_text)] if spec_text else \
        ["--input-shape", "1,3,8,8"]
    assert_clear(cli("inspect", MLP, *args), 1, "shape [1, 3, 8, 8] does not fit the model in layer '1'")


def write_spec(tmp_path: Path, text: str) -> Path:
    (tmp_path / "spec.yaml").write_text(text)
    return tmp_path / "spec.yaml"
