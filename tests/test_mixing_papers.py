"""MixtureGrowth as its paper and the authors' code (chaudatascience/mixturegrowth) do it, at
hand-made cases: the FLOPs normalisation, template init at the authors' scale, same-role
sharing across blocks and K per bank, frozen first/last coefficients, orthogonal new
coefficients per layer, the learning-rate restart at growth, identical fused nets."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from examples.models.wrn import build as wrn
from fxgrow import api
from fxgrow.errors import FxgrowError, SpecError
from fxgrow.nn.mixing import mix_producers
from fxgrow.passes.grow import GrowSpec, LrRestartSpec
from fxgrow.passes.grow_model import grow_model
from fxgrow.passes.template_mixing import TemplateMixingPass, kaiming_templates, share_groups
from fxgrow.specs import parse_spec
from fxgrow.train import Callback, Trainer
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def mixed(model, x, seed=0, **fields):
    return TemplateMixingPass(**fields)(model, x, seed=seed).graph_module


# --- FLOPs, as the paper normalises them ------------------------------------------------------

MLP_SPEC = {"entry": "examples/models/mlp.py", "kwargs": {"hidden": 8}, "example_input": [1, 1, 8, 8]}
SYNTH = {"name": "synthetic", "shape": [1, 8, 8], "num_classes": 10, "train_size": 64, "test_size": 16}


def run(tmp_path, name, passes, steps, seed=0, **train):
    spec = parse_spec({"name": name, "model": MLP_SPEC, "passes": passes,
                       "train": {"data": SYNTH, "steps": steps, "batch_size": 16, "seed": seed, "progress": "none",
                                 "optimizer": {"lr": 0.05}, **train}})
    torch.manual_seed(seed)
    result = api.compile_spec(spec, api.build_model(spec))
    return Trainer(result.graph_module, spec.train, result.callbacks, out_dir=tmp_path / name,
                   spec_dump=api.spec_dump(spec)).fit()


def test_flops_norm_counts_net_2_and_the_grown_net_over_the_targets_schedule(tmp_path):
    """Growth at step 20 of 24, one fused run of 20 steps, the target's schedule 20 steps (net
    1's, the default): the paper's norm is (20 F_small + 4 F_grown) / (20 F_grown) (0.45 at
    F_small / F_grown = 1/4, its 0.45X = 0.25 + 0.20); every net counted, (40 F_small + 4
    F_grown) / (20 F_grown); before issue 16 it was (40 F_small + 4 F_grown) / (24 F_grown)."""
    mix = {"kind": "template_mixing"}
    run(tmp_path, "net2", [mix], 20, seed=1)
    report = run(tmp_path, "grown", [mix, {"kind": "grow", "at": 20, "fuse": [str(tmp_path / "net2")]}], 24)
    section = report["template_mixing"]
    small = section["train_flops_before_growth"] / (3 * 16 * 20)  # per sample
    grown = (section["train_flops"] - section["train_flops_before_growth"]) / (3 * 16 * 4)
    assert 2 < grown / small < 4  # 64 inputs and 10 outputs do not grow
    r = small / grown
    assert section["reference_steps"] == 20 and section["reference_flops"] == pytest.approx(3 * 16 * 20 * grown)
    assert section["flops_norm"] == pytest.approx((20 * r + 4) / 20)
    assert section["flops_norm_all_nets"] == pytest.approx((40 * r + 4) / 20)
    assert section["flops_norm"] != pytest.approx((40 * r + 4) / 24)
    net2 = json.loads((tmp_path / "net2" / "report.json").read_text())["template_mixing"]
    assert net2["flops_norm"] == net2["flops_norm_all_nets"] == pytest.approx(1.0)  # never grown: all of it
    # the target's schedule set explicitly: 24 steps
    longer = run(tmp_path, "longer", [{**mix, "flops_reference": 24},
                                      {"kind": "grow", "at": 20, "fuse": [str(tmp_path / "net2")]}], 24)
    assert longer["template_mixing"]["flops_norm"] == pytest.approx((20 * r + 4) / 24)


# --- template init at the authors' scale -------------------------------------------------------

def test_kaiming_bank_is_kaiming_normal_of_the_stacked_bank():
    """torch's fan_in of a (K, Co, Ci, k, k) tensor is Co * Ci * k^2: std = sqrt(2) / sqrt(8 * 4 * 9)
    = 1/12 for a (2, 8, 4, 3, 3) bank, 1/sqrt(Co) of the per-template He std."""
    like = torch.empty(8, 4, 3, 3)
    bank = kaiming_templates(2, like, torch.Generator().manual_seed(0), bank=True)
    expected = torch.empty(2, 8, 4, 3, 3)
    nn.init.kaiming_normal_(expected, generator=torch.Generator().manual_seed(0))  # the authors' call
    assert torch.equal(bank, expected)
    assert nn.init._calculate_fan_in_and_fan_out(expected)[0] == 288 and math.sqrt(2 / 288) == pytest.approx(1 / 12)
    big = kaiming_templates(2, torch.empty(64, 32, 3, 3), torch.Generator().manual_seed(1), bank=True)
    per_template = kaiming_templates(2, torch.empty(64, 32, 3, 3), torch.Generator().manual_seed(1))
    assert float(big.std()) == pytest.approx(math.sqrt(2 / (64 * 32 * 9)), rel=0.02)
    assert float(big.std() / per_template.std()) == pytest.approx(1 / 8, rel=0.02)
    linear = kaiming_templates(2, torch.empty(10, 32), torch.Generator().manual_seed(2), bank=True)
    assert nn.init._calculate_fan_in_and_fan_out(linear)[0] == 320  # SLinear: out * in
    gm = mixed(nn.Sequential(nn.Linear(32, 10)), torch.randn(2, 32), template_init="kaiming_bank")
    assert next(iter(mix_producers(gm).values())).alpha.shape[-1] == 2


# --- same-role sharing, K per bank ------------------------------------------------------------------

def test_role_pairs_on_a_bottleneck_resnet():
    """torchvision resnet50's layer1: the same role in adjacent blocks shares (conv2 of blocks 0
    and 1; block 2's conv2 alone); the first block's conv1 (another shape) is alone, and a
    trailing index inside a block (downsample.0) is not a block index."""
    shapes = {}
    for b in range(3):
        shapes[f"layer1.{b}.conv1.weight"] = (64, 64 if b == 0 else 256, 1, 1)
        shapes[f"layer1.{b}.conv2.weight"] = (64, 64, 3, 3)
        shapes[f"layer1.{b}.conv3.weight"] = (256, 64, 1, 1)
        if b == 0:
            shapes["layer1.0.downsample.0.weight"] = (256, 64, 1, 1)
    shapes["fc.weight"] = (10, 2048)
    groups = share_groups(shapes, "role_pairs")
    assert ["layer1.0.conv2.weight", "layer1.1.conv2.weight"] in groups and ["layer1.2.conv2.weight"] in groups
    assert ["layer1.0.conv1.weight"] in groups and ["layer1.1.conv1.weight", "layer1.2.conv1.weight"] in groups
    assert ["layer1.0.conv3.weight", "layer1.1.conv3.weight"] in groups and ["layer1.0.downsample.0.weight"] in groups
    assert sorted(n for g in groups for n in g) == sorted(shapes)


def test_role_pairs_and_k_per_bank_on_a_wrn():
    gm = mixed(wrn(16, 1, stem=8), torch.randn(2, 1, 8, 8), share="role_pairs", templates_per_bank={"re:^3\\.": 4})
    table = {p.source: p for p in mix_producers(gm).values()}
    assert table["1.0.conv2.weight"].bank == table["1.1.conv2.weight"].bank        # conv2 of blocks 0 and 1
    assert table["1.1.conv1.weight"].bank != table["1.0.conv1.weight"].bank        # block 0's conv1: its own shape
    assert table["1.0.conv2.weight"].bank != table["1.1.conv1.weight"].bank        # another role
    assert {p.alpha.shape[-1] for s, p in table.items() if s.startswith("3.")} == {4}
    assert {p.alpha.shape[-1] for s, p in table.items() if not s.startswith("3.")} == {2}
    with pytest.raises(SpecError, match="different K"):
        mixed(wrn(16, 1), torch.randn(2, 1, 8, 8), share="role_pairs",
              templates_per_bank={"1.0.conv2": 3, "1.1.conv2": 4})


# --- frozen first and last coefficients ----------------------------------------------------------

class Snap(Callback):
    name = "snap"

    def __init__(self):
        self.states = []

    def on_train_start(self, ctx):
        self.states.append({k: v.clone() for k, v in ctx.model.state_dict().items()})

    def on_train_end(self, ctx):
        self.states.append({k: v.clone() for k, v in ctx.model.state_dict().items()})
        self.optimizer_params = {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
        self.model = ctx.model


@pytest.mark.parametrize("where", ["template_mixing", "grow"])
def test_frozen_first_and_last_coefficients_stay_and_templates_train(tmp_path, where):
    mix = {"kind": "template_mixing", "share": "none"}
    grow = {"kind": "grow", "at": 2}
    if where == "template_mixing":
        mix["freeze_coefficients"] = ["first", "last"]
    else:
        grow["freeze_coefficients"] = ["first", "last"]  # the authors' --freeze_first_last_growing
    spec = parse_spec({"name": "f", "model": MLP_SPEC, "passes": [mix, grow],
                       "train": {"data": SYNTH, "steps": 5, "batch_size": 16, "progress": "none"}})
    result = api.compile_spec(spec, api.build_model(spec))
    snap = Snap()
    Trainer(result.graph_module, spec.train, [*result.callbacks, snap], out_dir=tmp_path).fit()
    producers = mix_producers(snap.model)
    frozen = {path for path, p in producers.items() if not p.alpha.requires_grad}
    assert frozen == {"fxgrow.1.weight_mix", "fxgrow.5.weight_mix"}  # the first Linear and the classifier
    end = snap.states[-1]
    for path, p in producers.items():
        alpha = f"{path}.alpha"
        if path in frozen:
            assert p.grid in ((2, 1), (1, 2))  # the first layer's inputs and the classifier's outputs do not grow
            if where == "template_mixing":  # frozen all along: the source block is as initialised
                assert torch.equal(end[alpha][0, 0], snap.states[0][alpha].flatten())
            bank = f"{p.bank}.templates"  # (one source: the bank keeps its shape through growth)
            assert not torch.equal(end[bank], snap.states[0][bank])  # its templates train
        assert (id(p.alpha) in snap.optimizer_params) == (path not in frozen)
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report["template_mixing"]["frozen_coefficients"]) == ["1.weight", "5.weight"]
    with pytest.raises(SpecError, match="'nope' names none of the layers"):
        mixed(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4), freeze_coefficients=["nope"])


# --- orthogonal new coefficients, per layer ----------------------------------------------------------

class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.l1, self.l2, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.l2(torch.relu(self.l1(torch.relu(self.inp(x)))))))


def with_alphas(gm, alphas):
    state = copy.deepcopy(gm.state_dict())
    for layer, alpha in alphas.items():
        state[f"fxgrow.{layer}.weight_mix.alpha"].copy_(torch.tensor(alpha).view(1, 1, 2))
    return state


def test_orthogonal_new_coefficients_per_layer_on_a_shared_bank():
    """share: pairs, K = 2: l1 and l2 share a bank. Net 0: l1 (1, 0), l2 (0, 1); net 1: l1
    (0.6, 0.8), l2 (-0.8, 0.6). Per layer, l1's block (0, 1) (set 0) is orthogonal to l1's
    (1, 0): +-(0, 1), and its block (1, 0) (set 1) to (0.6, 0.8): +-(0.8, -0.6). Per bank, set s
    is already used by both layers' alphas, which span R^2: a random unit vector."""
    x = torch.randn(2, 8)
    gm = mixed(Pair(), x)
    assert mix_producers(gm)["fxgrow.l1.weight_mix"].bank == mix_producers(gm)["fxgrow.l2.weight_mix"].bank
    sources = [with_alphas(gm, {"l1": [1.0, 0.0], "l2": [0.0, 1.0]}), with_alphas(gm, {"l1": [0.6, 0.8], "l2": [-0.8, 0.6]})]
    new, _ = grow_model(gm, sources, 2, x, orthogonal_scope="layer")
    a = mix_producers(new)["fxgrow.l1.weight_mix"].alpha.detach().double()
    torch.testing.assert_close(a[0, 1].abs(), torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(a[1, 0] * torch.sign(a[1, 0][0]), torch.tensor([0.8, -0.6], dtype=torch.float64),
                               atol=1e-7, rtol=0)
    bank, _ = grow_model(gm, sources, 2, x, orthogonal_scope="bank")
    b = mix_producers(bank)["fxgrow.l1.weight_mix"].alpha.detach().double()
    assert abs(float(b[0, 1] @ b[0, 0])) > 1e-3  # not orthogonal to its layer's own set-0 alpha


def orthogonal_blocks(gm) -> tuple[int, int]:
    """(new blocks orthogonal to their layer's diagonal block of the same set, new blocks) over
    the 2x2 grids of a fused growth."""
    good = total = 0
    for p in mix_producers(gm).values():
        if p.grid != (2, 2):
            continue
        a, sets = p.alpha.detach().double(), p.block_sets()
        for r, c in ((0, 1), (1, 0)):
            s = sets[r][c]
            total += 1
            good += abs(float(a[r, c] @ a[s, s])) < 1e-6 and abs(float(a[r, c].norm()) - 1) < 1e-6  # float32 alphas
    return good, total


def test_wrn28_fused_with_shared_pairs_gets_every_new_block_orthogonal():
    """The issue's count: a fused WRN-28 (any width; here 2, stem 8) with share: pairs and K = 2."""
    x = torch.randn(2, 3, 8, 8)
    nets = [mixed(wrn(28, 2, in_channels=3, stem=8), x, seed=s) for s in (0, 1)]
    sources = [n.state_dict() for n in nets]
    layer, _ = grow_model(nets[0], sources, 2, x, orthogonal_scope="layer")
    bank, _ = grow_model(nets[0], sources, 2, x, orthogonal_scope="bank")
    assert orthogonal_blocks(layer) == (54, 54)
    assert orthogonal_blocks(bank) == (18, 54)  # only the 9 layers without a bank partner


# --- the learning-rate restart at growth -------------------------------------------------------------

CIFAR = [1e-05, 9.829e-05, 9.332e-05, 8.557e-05, 7.582e-05, 6.5e-05, 5.418e-05, 4.443e-05, 3.668e-05, 3.171e-05,
         5e-05, 4.951e-05, 4.809e-05, 4.588e-05, 4.309e-05, 4e-05, 3.691e-05, 3.412e-05, 3.191e-05, 3.049e-05,
         2.5e-05, 2.512e-05, 2.548e-05, 2.603e-05, 2.673e-05, 2.75e-05, 2.827e-05, 2.897e-05, 2.952e-05, 2.988e-05,
         1.25e-05, 1.293e-05, 1.417e-05, 1.611e-05, 1.855e-05, 2.125e-05, 2.395e-05, 2.639e-05, 2.833e-05, 2.957e-05]


def test_lr_restart_is_the_authors_cosine_cycles():
    """The CIFAR README (growth at epoch 400 of 440, lr_growing 1e-4, 4 cycles, warm-up 1, min
    3e-5): the 40 epochs' rates, and timm's CosineLRScheduler, which the authors call."""
    restart = LrRestartSpec(base=1e-4)
    got = [restart.lr(j, 40) for j in range(40)]
    assert got == pytest.approx(CIFAR, rel=1e-3)
    timm = pytest.importorskip("timm.scheduler")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-4)
    ref = timm.CosineLRScheduler(opt, t_initial=10, lr_min=3e-5, cycle_mul=1, cycle_decay=0.5, cycle_limit=4,
                                 warmup_t=1, warmup_lr_init=1e-5, warmup_prefix=False, t_in_epochs=True)
    assert got == pytest.approx([ref._get_lr(j)[0] for j in range(40)], rel=1e-12, abs=0)
    imagenet = LrRestartSpec(base=0.004, cycles=1, warmup_epochs=0)  # ours_bank.sh: 14 epochs after growth
    assert [imagenet.lr(j, 14) for j in (0, 1, 13)] == pytest.approx([0.004, 0.00395, 7.977e-05], rel=1e-3)


class LrTrace(Callback):
    name = "lrs"

    def __init__(self):
        self.lrs = []

    def on_step_start(self, ctx):
        self.lrs.append(ctx.optimizer.param_groups[0]["lr"])


def restart_spec(lr):
    return parse_spec({"name": "lr", "model": MLP_SPEC, "passes": [
        {"kind": "template_mixing"}, {"kind": "grow", "at": {"epoch": 2}, "lr": lr}],
        "train": {"data": SYNTH, "epochs": 6, "batch_size": 16, "progress": "none",
                  "optimizer": {"lr": 0.1}, "schedule": {"name": "constant"}}})


def test_lr_restart_in_the_loop(tmp_path):
    """4 steps an epoch, growth at epoch 2 of 6: 4 epochs after it, 2 cycles of 2."""
    spec = restart_spec({"base": 0.02, "min": 0.001, "cycles": 2})
    result = api.compile_spec(spec, api.build_model(spec))
    trace = LrTrace()
    Trainer(result.graph_module, spec.train, [*result.callbacks, trace], out_dir=tmp_path / "a").fit()
    restart = spec.passes[1].lr
    assert trace.lrs == pytest.approx([0.1] * 8 + [restart.lr(j // 4, 4) for j in range(16)])
    assert trace.lrs[8] == pytest.approx(1e-5) and trace.lrs[12] == pytest.approx(0.001 + 0.5 * 0.019)
    bad = restart_spec({"base": 0.02, "cycles": 8})
    result = api.compile_spec(bad, api.build_model(bad))
    with pytest.raises(FxgrowError, match="4 epochs after growth cannot hold 8"):
        Trainer(result.graph_module, bad.train, result.callbacks, out_dir=tmp_path / "b").fit()


def test_lr_spec_fields():
    spec = GrowSpec(at=3, lr={"base": 1e-4})
    assert (spec.lr.min, spec.lr.cycles, spec.lr.cycle_decay, spec.lr.warmup_epochs, spec.lr.warmup_start) == \
        (3e-5, 4, 0.5, 1, 1e-5)
    with pytest.raises(Exception, match="base"):
        GrowSpec(at=3, lr={})


# --- identical fused nets ----------------------------------------------------------------------------

def test_fusing_a_twin_warns_and_another_seed_does_not(tmp_path):
    mix, constant = {"kind": "template_mixing"}, {"schedule": {"name": "constant"}}
    run(tmp_path, "twin", [mix], 4, seed=0, **constant)     # this run's spec and seed, trained to the growth step
    run(tmp_path, "other", [mix], 4, seed=1, **constant)
    with pytest.warns(UserWarning) as caught:
        run(tmp_path, "grown_twin", [mix, {"kind": "grow", "at": 4, "fuse": [str(tmp_path / "twin")]}], 6,
            seed=0, **constant)
    said = [str(w.message) for w in caught]
    assert any("this run's seed (0)" in m for m in said) and any("identical to this run's model" in m for m in said)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(tmp_path, "grown_other", [mix, {"kind": "grow", "at": 4, "fuse": [str(tmp_path / "other")]}], 6,
            seed=0, **constant)


# --- growing more than once (fxgrow's own design) ----------------------------------------------------

@pytest.mark.parametrize("build, shape", [(lambda: wrn(10, 0.5, stem=4), (1, 8, 8)),
                                          (lambda: Pair(), (8,))])
def test_a_grown_net_grows_again_blockwise(build, shape):
    """A once-grown (fused) net grown again with zeroed new blocks computes exactly what it did;
    two grown nets fused into a second growth sum their logits, as two small nets do the first."""
    from tests.test_grow import trained_like

    x = torch.randn(4, *shape)
    once = []
    for seed in (0, 2):
        nets = [trained_like(mixed(build(), x, seed=s), s) for s in (seed, seed + 1)]
        once.append(trained_like(grow_model(nets[0], [n.state_dict() for n in nets], 2, x).model, seed).eval())
    alone, _ = grow_model(once[0], [once[0].state_dict()], 2, x, new_coefficients="zero")
    torch.testing.assert_close(alone.eval()(x), once[0](x), rtol=1e-5, atol=1e-5)
    fused, _ = grow_model(once[0], [n.state_dict() for n in once], 2, x, new_coefficients="zero")
    torch.testing.assert_close(fused.eval()(x), once[0](x) + once[1](x), rtol=1e-5, atol=1e-5)
    grids = {p.grid for p in mix_producers(fused).values()}
    assert (4, 4) in grids and {p.sets for p in mix_producers(fused).values()} == {4}
    # orthogonal new coefficients again: per layer and set, against what that layer already mixes
    again, _ = grow_model(once[0], [once[0].state_dict()], 2, x)
    assert {p.grid for p in mix_producers(again).values()} >= {(4, 4)}


def test_growing_twice_in_training_and_across_resume(tmp_path):
    passes = [{"kind": "template_mixing"}, {"kind": "grow", "at": 3, "again": [6]}]
    spec = parse_spec({"name": "twice", "model": MLP_SPEC, "passes": passes,
                       "train": {"data": SYNTH, "steps": 10, "batch_size": 16, "progress": "none",
                                 "checkpoint_every_steps": 4}})

    def trainer(out, extra=(), resume=None):
        torch.manual_seed(0)
        result = api.compile_spec(spec, api.build_model(spec))
        return Trainer(result.graph_module, spec.train, [*extra, *result.callbacks], out_dir=out,
                       spec_dump=api.spec_dump(spec), resume=resume)

    whole = trainer(tmp_path / "whole")
    report = whole.fit()
    assert report["grow"]["growths"] == 2 and report["grow"]["growth_steps"] == [3, 6]
    assert [w["after"] for w in report["grow"]["again"][0]["widths"]] == [32, 32]  # 8 -> 16 -> 32 hidden units
    assert report["template_mixing"]["reference_steps"] == 3  # net 1's schedule: before the first growth

    class Stop(Callback):
        name = "stop"

        def after_step(self, ctx):
            if ctx.step == 9:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "cut", [Stop()]).fit()  # its last checkpoint: step 8, after both growths
    resumed = trainer(tmp_path / "cut", resume=tmp_path / "cut")
    resumed.fit()
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    with pytest.raises(SpecError, match="come one after another|lr restart"):
        parse_spec({"passes": [{"kind": "template_mixing"},
                               {"kind": "grow", "at": 3, "again": [6], "lr": {"base": 0.01}}]})
