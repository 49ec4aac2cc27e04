"""prune_regrow against the papers and the authors' code (issue 16), at hand-made cases:
RigL's drop-fraction window and floor, ERK's power and ER, granet_sparse's pruning end,
GraNet_uniform's classifier density, momentum regrowth, ITOP's exploration rate.

The expected numbers are computed from the authors' formulas (google-research/rigl
`sparse_optimizers_base.py` get_drop_fraction / `_get_update_op`, `sparse_utils.py`
get_sparsities_erdos_renyi; VITA-Group/GraNet `CIFAR/sparselearning/core.py`
pruning_uniform; ITOP's fired_masks), not from fxgrow."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fxgrow.analysis.erk import er_densities, erk_densities, layout_counts
from fxgrow.errors import FxgrowError, SpecError
from fxgrow.passes.prune_regrow import PruneRegrowCallback, resolve_schedule
from fxgrow.passes.prune_regrow_counts import keep_per_layer
from fxgrow.passes.prune_regrow_masks import drop_count, masked_weights, regrow
from fxgrow.passes.prune_regrow_scores import MomentumScores
from tests.test_prune_regrow import Loop, prune, spec
from tests.zoo import MLP, ResNetTiny


# --- RigL ------------------------------------------------------------------------------------

def rigl_cosine(t: int, d0: float = 0.3, end: int = 750) -> float:
    """tf cosine_decay(d0, global_step=t, decay_steps=end - begin), alpha 0, begin 0."""
    return d0 * 0.5 * (1 + math.cos(math.pi * min(t, end) / end))


def test_rigl_drop_fraction_decays_to_zero_over_its_update_window():
    s = resolve_schedule(spec(preset="rigl", final_sparsity=0.9, schedule={"every": 100}), 1000)
    assert (s.end, s.regrow_until) == (750, 750)
    assert s.regrow_fraction(375) == pytest.approx(0.15, abs=1e-15)           # half the window: half of 0.3
    assert s.regrow_fraction(750) == 0.0                                       # not 0.0439 (cosine over T)
    for t in (0, 100, 700):
        assert s.regrow_fraction(t) == pytest.approx(rigl_cosine(t), abs=1e-15)
    assert s.regrow_fraction(100) == pytest.approx(0.287031818646, abs=1e-12)
    assert s.regrow_fraction(700) == pytest.approx(0.003277859890, abs=1e-12)
    events = [t for t in range(1, 1001) if s.is_regrow_event(t)]
    assert events == list(range(100, 751, 100))                                # the mask is frozen after 750
    assert sum(s.regrow_fraction(t) for t in events) == pytest.approx(0.975, abs=1e-12)
    # GraNet's cosine over all of training stays the default
    granet = resolve_schedule(spec(final_sparsity=0.9, schedule={"end": 0.5, "every": 100}), 1000)
    assert granet.regrow_fraction(500) == pytest.approx(0.005 + 0.495 * 0.5)


def test_rigl_floors_the_per_layer_drop_count():
    s = resolve_schedule(spec(preset="rigl", final_sparsity=0.9, schedule={"every": 100}), 1000)
    assert s.regrow_rounding == "floor" and resolve_schedule(spec(final_sparsity=0.9, schedule={
        "every": 100}), 1000).regrow_rounding == "ceil"
    # int(n_ones * drop_fraction): 10 active weights at r = 0.15 drop 1 (GraNet's ceil: 2); r = 0.05 drops none
    assert drop_count(0.15, 10, "floor") == 1 and drop_count(0.15, 10) == 2
    assert drop_count(0.05, 10, "floor") == 0 and drop_count(0.005, 1000, "floor") == 5


def test_rigl_event_moves_the_floor_count_in_a_layer():
    gm, _ = prune(MLP(), final_sparsity=0.9, initial_sparsity=0.9, init_distribution="uniform")
    w = masked_weights(gm)[0]
    nnz = w.nnz()
    grad = torch.randn(w.mask.shape)
    dropped, _ = regrow(w, 0.15, grad, rounding="floor")
    assert dropped == math.floor(0.15 * nnz) and w.nnz() == nnz


# --- ERK power and ER -------------------------------------------------------------------------

SHAPES = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 32)]  # 432, 4608, 320 weights


@pytest.mark.parametrize("power, expected", [
    (1.0, [0.2563513927, 0.0519111570, 0.5814049587]),
    (0.5, [0.1794132545, 0.0807359645, 0.2701942169]),
    (0.0, [0.1, 0.1, 0.1]),                              # "0 means uniform"
])
def test_erk_power_scale(power, expected):
    assert erk_densities(SHAPES, 0.1, power) == pytest.approx(expected, abs=1e-10)


def test_er_uses_the_channel_dims_only():
    # (n_in + n_out) / (n_in * n_out), no kernel dims, no power (RigL's erdos_renyi)
    assert er_densities(SHAPES, 0.1) == pytest.approx([0.3289405685, 0.0779069767, 0.1090697674], abs=1e-10)
    # at density 0.5 the first layer would exceed 1: dense, the rest solved again
    assert er_densities(SHAPES, 0.5) == pytest.approx([1.0, 0.4446202532, 0.6224683544], abs=1e-10)
    assert erk_densities(SHAPES, 0.5) == pytest.approx([1.0, 0.4184027778, 1.0], abs=1e-10)


def test_the_spec_lays_out_er_and_powered_erk():
    for fields, distribution, power in (({"init_distribution": "er"}, "er", 1.0),
                                        ({"erk_power_scale": 0.5}, "erk", 0.5)):
        gm, _ = prune(ResNetTiny(in_ch=1), final_sparsity=0.9, initial_sparsity=0.9, **fields)
        ws = masked_weights(gm)
        assert [w.nnz() for w in ws] == layout_counts([w.mask.shape for w in ws], 0.9, distribution, power)
    shapes = [w.mask.shape for w in ws]  # convs: ER leaves the kernel dims out, ERK does not
    assert len({tuple(layout_counts(shapes, 0.9, d, p)) for d, p in (("er", 1), ("erk", 1), ("erk", 0.5))}) == 3


# --- granet_sparse's pruning end ----------------------------------------------------------------

def test_granet_sparse_pruning_end_is_settable():
    s = resolve_schedule(spec(preset="granet_sparse", final_sparsity=0.9, schedule={"end": 0.3, "every": 10}), 1000)
    assert (s.start, s.end, s.initial_sparsity) == (0, 300, 0.5)   # ImageNet: pruning ends at 30 of 100 epochs
    default = resolve_schedule(spec(preset="granet_sparse", final_sparsity=0.9, schedule={"every": 10}), 1000)
    assert default.end == 500                                       # CIFAR: the first lr decay
    with pytest.raises(SpecError, match="initial_sparsity"):        # what the preset is stays fixed
        spec(preset="granet_sparse", final_sparsity=0.9, initial_sparsity=0.3)


# --- GraNet_uniform: the classifier at density 0.2 from 80% ------------------------------------

UNIFORM = [(25, 40), (50, 60), (10, 100)]  # 1000, 3000 and a 1000-weight classifier


@pytest.mark.parametrize("sparsity, expected", [
    (0.50, [500, 1500, 500]),
    (0.79, [210, 630, 210]),      # the authors' int() keeps 209, 629, 209
    (0.80, [200, 600, 200]),      # d' = 0.2: the rule is continuous
    (0.90, [75, 225, 200]),       # d' = (500 - 200) / 4000
    (0.95, [13, 37, 200]),        # d' = 0.0125: 12.5 and 37.5, the remainder to the earlier layer
])
def test_granet_uniform_counts(sparsity, expected):
    counts = keep_per_layer(UNIFORM, sparsity, 0.0, "erk", classifier=2, classifier_density=(0.8, 0.2))
    assert counts == expected and sum(counts) == 5000 - round(sparsity * 5000)


def test_granet_uniform_refuses_a_classifier_larger_than_the_budget():
    with pytest.raises(FxgrowError, match="fewer than the 200"):
        keep_per_layer(UNIFORM, 0.97, 0.0, "erk", classifier=2, classifier_density=(0.8, 0.2))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 10), nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.body(x.flatten(1)))
        return self.a(h) + self.b(h)


def test_granet_uniform_finds_the_classifier_in_the_graph_and_trains_to_its_counts():
    gm, cbs = prune(MLP(), preset="granet_uniform", final_sparsity=0.9, schedule={"start": 0, "end": 8, "every": 4})
    cb: PruneRegrowCallback = cbs[0]
    assert cb.classifier == "head.weight"  # found as the layer feeding the output, not by its name
    loop = Loop(gm, cbs, total_steps=12).run()
    ws = {w.key: w for w in masked_weights(gm)}
    assert ws["head.weight"].nnz() == round(0.2 * ws["head.weight"].numel)
    shapes = [w.mask.shape for w in ws.values()]
    assert [w.nnz() for w in ws.values()] == keep_per_layer(shapes, 0.9, 0.0, "erk", classifier=2,
                                                             classifier_density=(0.8, 0.2))
    assert loop.records[-1]["prune_regrow/target_sparsity"] == 0.9
    with pytest.raises(SpecError, match="exactly one masked layer"):
        prune(TwoHeads(), preset="granet_uniform", final_sparsity=0.9)
    with pytest.raises(SpecError, match="not among the targets"):
        prune(MLP(), preset="granet_uniform", final_sparsity=0.9, targets={"exclude": ["head"]})
    with pytest.raises(FxgrowError, match="fewer than"):
        prune(MLP(), preset="granet_uniform", final_sparsity=0.99)  # 31 weights left, 64 for the classifier


# --- momentum regrowth -----------------------------------------------------------------------------

def test_momentum_grows_where_the_average_gradient_is_largest():
    """Two steps of dense gradients at 4 inactive positions: g1 = [1, 0, 0, 0], g2 = [0, 0.5, 0, 0].
    With beta 0.9 the average is 0.1 * [0.9, 0.5, 0, 0]: momentum regrows position 0, the
    last gradient alone would regrow position 1."""
    scores = MomentumScores(0.9)
    g1, g2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0.5, 0, 0])
    scores.update("w", g1)
    scores.update("w", g2)
    torch.testing.assert_close(scores.m["w"], 0.1 * torch.tensor([0.9, 0.5, 0, 0]))
    gm, _ = prune(nn.Sequential(nn.Linear(4, 2, bias=False)), final_sparsity=0.5, initial_sparsity=0.5,
                  init_distribution="uniform", example=None)
    w = masked_weights(gm)[0]
    active = torch.tensor([[False, False, False, False], [True, True, True, True]])
    w.set_active(active, None)
    with torch.no_grad():
        w.param.copy_(torch.tensor([[0.0, 0, 0, 0], [5.0, 6.0, 7.0, 0.1]]))  # 0.1: the weakest, dropped
    full = lambda v: torch.cat([v, torch.zeros(4)]).view(2, 4)  # noqa: E731  (the inactive row's scores)
    for score, grown in ((scores.score("w"), 0), (g2.abs(), 1)):
        w.set_active(active, None)
        w.param.data[1, 3] = 0.1
        regrow(w, 0.25, full(score))
        assert w.active[0].nonzero().flatten().tolist() == [grown] and not w.active[1, 3]


def test_normalized_momentum_is_adams_ratio():
    scores = MomentumScores(0.9, normalized=True, beta2=0.999)
    g = torch.tensor([2.0, -1.0])
    scores.update("w", g)
    torch.testing.assert_close(scores.score("w"), (0.1 * g).abs() / ((0.001 * g * g).sqrt() + 1e-8))


class DenseGrads:
    """Records each step's captured dense gradients (runs before the prune callback's after_step)."""

    name = "probe"

    def __init__(self, log):
        self.log = log

    def __getattr__(self, event):
        return lambda *a, **k: None

    def after_step(self, ctx):
        self.log.append({w.key: None if w.mask_module.dense_grad is None else w.mask_module.dense_grad.clone()
                         for w in masked_weights(ctx.model)})


def test_momentum_averages_the_dense_gradient_of_every_step_and_survives_resume():
    with pytest.raises(SpecError, match="regrow"):  # rigl fixes gradient regrowth
        prune(MLP(), final_sparsity=0.8, preset="rigl", regrow="momentum")
    gm, cbs = prune(MLP(), final_sparsity=0.8, initial_sparsity=0.8, regrow="momentum",
                    regrow_fraction={"initial": 0.3, "final": 0.0}, schedule={"every": 4}, regrow_until="schedule_end")
    log: list = []
    cb: PruneRegrowCallback = cbs[0]
    Loop(gm, [DenseGrads(log), cb], total_steps=12).run()
    assert all(g is not None for step in log[:8] for g in step.values())   # until the last regrowth (step 8)...
    assert all(g is None for step in log[9:] for g in step.values())       # ...and not after it
    for key in cb.momentum.m:
        expected = torch.zeros_like(cb.momentum.m[key])
        for step in log[:9]:
            if step[key] is not None:
                expected = 0.9 * expected + 0.1 * step[key]
        torch.testing.assert_close(cb.momentum.m[key], expected)
    assert cb.report()["moved"] > 0
    again = PruneRegrowCallback(cb.spec)
    again.load_state_dict(cb.state_dict())
    assert all(torch.equal(again.momentum.m[k], cb.momentum.m[k]) for k in cb.momentum.m)


# --- ITOP's exploration rate ----------------------------------------------------------------------

def test_exploration_rate_counts_positions_ever_active():
    """10 weights at 50%; each event moves 2 weights to new positions: 0.5 -> 0.7 -> 0.9, and
    moving back to positions that were active before does not raise it."""
    gm, _ = prune(nn.Sequential(nn.Linear(5, 2, bias=False)), final_sparsity=0.5, initial_sparsity=0.5,
                  init_distribution="uniform", example=None)
    w = masked_weights(gm)[0]
    start = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    w.set_active(start.view(2, 5), None)
    w.fired.copy_(w.active)  # the initial layout is where exploring starts
    rates = [PruneRegrowCallback.measure([w])["exploration_rate"]]
    for active in ([0, 0, 1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 1, 1, 1, 0, 0, 0]):
        w.set_active(torch.tensor(active, dtype=torch.bool).view(2, 5), None)
        rates.append(PruneRegrowCallback.measure([w])["exploration_rate"])
    assert rates == pytest.approx([0.5, 0.7, 0.9, 0.9])


def test_the_report_gives_the_exploration_rate():
    gm, cbs = prune(MLP(), final_sparsity=0.9, preset="rigl", schedule={"every": 3})
    start = sum(w.nnz() for w in masked_weights(gm)) / sum(w.numel for w in masked_weights(gm))
    Loop(gm, cbs, total_steps=12).run()
    report = cbs[0].report()
    assert start < report["exploration_rate"] <= 1 and report["moved"] > 0
    ws = masked_weights(gm)
    assert report["exploration_rate"] == pytest.approx((report["moved"] + start * sum(w.numel for w in ws))
                                                       / sum(w.numel for w in ws), abs=0.02)
    assert set(report["exploration"]) == {w.key for w in ws}
