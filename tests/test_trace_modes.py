"""Mode-aware tracing: modules that read `self.training` behave in the traced, rewritten and
folded model as in the original, in train() (same random numbers) and in eval(); a branch
that cannot be kept is refused naming the module and the line; tracing changes nothing in
the user's model."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxgrow import api
from fxgrow.errors import TraceError
from fxgrow.fold import fold
from fxgrow.passes import compose
from fxgrow.passes.compander import CompanderPass
from fxgrow.passes.prune_regrow import PruneRegrowPass
from fxgrow.specs.root import parse_spec
from fxgrow.trace import META_KEY, ModeSelect, trace


class BatchNormAct(nn.BatchNorm2d):
    """As timm's BatchNormAct2d: a BatchNorm subclass FX traces through, its forward reads
    self.training (batch statistics, the running-stat update) and ends in an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class DropPath(nn.Module):
    """As timm's DropPath: no parameters, a random per-sample mask only while training."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Holds weight matrices and reads self.training for a constant (timm's Attention)."""

    def __init__(self, d, p=0.3):
        super().__init__()
        self.qkv, self.proj, self.p = nn.Linear(d, 3 * d), nn.Linear(d, d), p

    def forward(self, x):  # x: (N, L, d)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.proj(out)


class Net(nn.Module):
    """Every kind at once: a weightless reader with parameters (BatchNormAct), one without
    (DropPath), a reader with weights (Attention) and the root (dropout with
    training=self.training)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = BatchNormAct(8)
        self.drop_path = DropPath(0.5)
        self.attn = Attention(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = x + self.drop_path(x)
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        return self.fc(F.dropout(t.mean(1), p=0.5, training=self.training))


def build():
    return Net()


def outputs(model, x, seed=3):
    torch.manual_seed(seed)
    return model(x)


def equal_in_both_modes(ref, model, x, **tol):
    """`model` gives `ref`'s outputs in train (same RNG), eval, train, eval; running
    statistics stay equal too."""
    for mode in ("train", "eval", "train", "eval"):
        getattr(ref, mode)(), getattr(model, mode)()
        torch.testing.assert_close(outputs(model, x), outputs(ref, x), **tol)
    mine = model.state_dict()
    for key, value in ref.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(mine[key], value, **tol)


def test_each_kind_of_reader_follows_the_mode():
    torch.manual_seed(0)
    model, x = Net().train(), torch.randn(4, 1, 6, 6)
    before = copy.deepcopy(model.state_dict())
    gm = trace(model)
    found = gm.meta[META_KEY]
    assert found["mode_leaves"] == ["bn", "drop_path"]             # weightless readers stay modules
    assert set(found["mode_readers"]) == {"", "attn"}             # the root and the attention
    assert found["mode_readers"][""].endswith(f"{__name__.split('.')[-1]}.py:{Net.forward.__code__.co_firstlineno + 5}")
    selects = [m for m in gm.modules() if isinstance(m, ModeSelect)]
    assert sorted((s.train_value, s.eval_value) for s in selects) == [(0.3, 0.0), (True, False)]
    # tracing left the model as it was: its buffers (num_batches_tracked), mode, attributes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not any(k.startswith("_tensor_constant") for k in vars(model))
    equal_in_both_modes(copy.deepcopy(model), copy.deepcopy(gm), x, rtol=0, atol=0)
    gm.eval()
    torch.testing.assert_close(gm(x), gm(x), rtol=0, atol=0)     # no dropout left in eval


def test_preserving_rewrite_and_fold_follow_the_mode_and_load_into_the_original():
    torch.manual_seed(0)
    model, x = Net().train(), torch.randn(4, 1, 6, 6)
    result = compose(CompanderPass(), PruneRegrowPass(final_sparsity=0.5))(model, example_input=x[:1])
    tol = dict(rtol=1e-5, atol=1e-6)
    equal_in_both_modes(copy.deepcopy(model), copy.deepcopy(result.graph_module), x, **tol)
    folded = fold(result.graph_module)
    state = copy.deepcopy(folded.state_dict())
    equal_in_both_modes(copy.deepcopy(model), folded, x, **tol)
    fresh = Net()
    fresh.load_state_dict(state, strict=True)
    equal_in_both_modes(copy.deepcopy(model), fresh.train(), x, **tol)


class TrainOnlyHead(nn.Module):
    """A branch with weights that only runs in train mode (torchvision GoogLeNet's aux heads)."""

    def __init__(self):
        super().__init__()
        self.body, self.aux = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = self.body(x)
        if self.training:
            x = x + self.aux(x)
        return x


def test_a_branch_that_changes_what_runs_is_refused_naming_module_and_line():
    model = nn.Sequential(nn.Linear(4, 8), TrainOnlyHead())
    with pytest.raises(TraceError) as info:
        trace(model)
    msg = str(info.value)
    line = TrainOnlyHead.forward.__code__.co_firstlineno + 2
    assert "'1' (TrainOnlyHead) for both train() and eval()" in msg
    assert f"test_trace_modes.py:{line}" in msg and 'leaf_modules: ["1"]' in msg
    gm = trace(model, leaf_modules=["1"])  # the suggested fix: opaque, follows the mode as a module
    x = torch.randn(2, 4)
    equal_in_both_modes(copy.deepcopy(model), gm, x, rtol=0, atol=0)


def test_tracing_twice_gives_the_same_graph_and_state():
    model = Net().train()
    first, second = trace(model), trace(model)
    assert str(first.graph) == str(second.graph)
    assert model.bn.num_batches_tracked.item() == 0


def test_report_accuracy_is_the_folded_models_eval_accuracy(tmp_path):
    """report.json is computed in eval mode: equal to the accuracy the folded model, loaded
    into the user's class, has on the test split (root dropout p=0.5 would change it)."""
    from fxgrow.train.data import load_data

    spec = parse_spec({"model": {"example_input": [1, 1, 8, 8]}, "passes": [{"kind": "compander"}],
                       "train": {"data": "digits", "steps": 4, "batch_size": 32, "progress": "none"}})
    report = api.run(spec, "tests.test_trace_modes:build", out_dir=tmp_path / "run")
    written = json.loads((tmp_path / "run" / "report.json").read_text())
    assert written["accuracy"] == report["accuracy"]
    model = build().eval()
    model.load_state_dict(torch.load(tmp_path / "run" / "folded_state_dict.pt"), strict=True)
    data = load_data(spec.train.data)
    x, y = data.test
    with torch.no_grad():
        accuracy = (model(data.prepare(x)).argmax(1) == y).double().mean().item()
    assert written["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert isinstance(written["flops"], int) and written["flops"] > 0
