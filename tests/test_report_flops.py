"""The end of a run never loses its artifacts to the FLOPs count: a model FlopCounterMode
cannot run on one example (a graph traced elsewhere with train-mode batch statistics baked
in) still gets report.json (flops null, the reason) and its folded model."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxgrow import api
from fxgrow.specs.train import TrainSpec
from fxgrow.trace import trace
from fxgrow.train import Trainer


class BatchNormSub(nn.BatchNorm1d):
    """A BatchNorm FX traces through: `training` becomes a constant of the traced graph."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = BatchNormSub(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x).mean((2, 3))))  # batch statistics need batch > 1


SPEC = TrainSpec(data="digits", steps=3, batch_size=16, progress="none")


def test_flops_that_cannot_be_counted_leave_the_report_and_folded_model(tmp_path):
    gm = fx.symbolic_trace(Pooled().train())  # training=True frozen in: batch 1 fails in eval too
    with pytest.warns(UserWarning, match="forward FLOPs not counted"):
        report = Trainer(gm, SPEC, out_dir=tmp_path / "run", on_finish=api.save_folded).fit()
    written = json.loads((tmp_path / "run" / "report.json").read_text())
    assert written["flops"] is None and report["flops"] is None
    assert "does not fit the model" in written["flops_error"] and "Expected more than 1 value" in written["flops_error"]
    assert (tmp_path / "run" / "folded.pt").is_file() and (tmp_path / "run" / "folded_state_dict.pt").is_file()


def test_the_mode_aware_trace_counts_them(tmp_path):
    gm = trace(Pooled().train())  # the BatchNorm subclass reads self.training: a leaf, eval at batch 1
    report = Trainer(gm, SPEC, out_dir=tmp_path / "run", on_finish=api.save_folded).fit()
    assert isinstance(report["flops"], int) and report["flops"] > 0 and "flops_error" not in report
