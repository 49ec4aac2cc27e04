"""prune_regrow (ALGORITHMS.md section 3): schedule, masks, events, invariants, resume."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxgrow.analysis.erk import allocate_counts, erk_densities, layout_counts
from fxgrow.errors import FxgrowError, SpecError
from fxgrow.fold import fold
from fxgrow.nn.mask import MaskProducer
from fxgrow.passes import compose
from fxgrow.passes.prune_regrow import PruneRegrowPass, Schedule, resolve_schedule
from fxgrow.passes.prune_regrow_masks import drop_count, masked_weights, prune_global, prune_layer, regrow
from fxgrow.specs.root import parse_spec
from tests.zoo import MLP, SMALL_ZOO, Depthwise, ResNetTiny


class Loop:
    """The training loop's event order on a fixed stream of batches (the real loop's
    contract, see fxgrow/train/callbacks.py), enough to drive a callback in unit tests."""

    def __init__(self, model, callbacks, total_steps, optimizer="sgd", seed=0, batch=16, in_shape=(1, 8, 8)):
        self.model, self.callbacks, self.total_steps, self.seed = model, callbacks, total_steps, seed
        self.optimizer = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
                          if optimizer == "sgd" else torch.optim.AdamW(model.parameters(), lr=1e-2))
        self.step = self.epoch = 0
        self.steps_per_epoch = total_steps
        self.device = torch.device("cpu")
        self.batch = self.loss = None
        self.records = []
        self.batch_size, self.in_shape = batch, in_shape

    def log(self, record):
        self.records.append({"step": self.step, **record})

    def data(self, step):
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(self.batch_size, *self.in_shape, generator=g), torch.randint(0, 10, (self.batch_size,), generator=g)

    def run(self, until=None, start=True):
        if start:
            for cb in self.callbacks:
                cb.on_train_start(self)
        while self.step < (until or self.total_steps):
            self.batch = self.data(self.step)
            for cb in self.callbacks:
                cb.on_step_start(self)
            self.optimizer.zero_grad(set_to_none=True)
            self.loss = F.cross_entropy(self.model(self.batch[0]), self.batch[1])
            self.loss.backward()
            for cb in self.callbacks:
                cb.after_backward(self)
            self.optimizer.step()
            self.step += 1
            for cb in self.callbacks:
                cb.after_step(self)
        if self.step == self.total_steps:
            for cb in self.callbacks:
                cb.on_train_end(self)
        return self


def prune(model, example=None, seed=0, **fields):
    fields.setdefault("final_sparsity", 0.9)
    result = PruneRegrowPass(**fields)(model, example_input=example, seed=seed)
    return result.graph_module, result.callbacks


def masks(gm):
    return {w.key: w for w in masked_weights(gm)}


# --- the schedule ------------------------------------------------------------------------

def make_schedule(**kw):
    base = dict(initial_sparsity=0.0, final_sparsity=0.9, start=0, end=10, every=3, shape="cubic", total_steps=20,
                regrow="gradient", regrow_initial=0.5, regrow_final=0.005, regrow_until=20)
    return Schedule(**{**base, **kw})


def test_schedule_formula_at_every_event_and_exact_landing():
    s = make_schedule()
    prune_events = [t for t in range(1, 21) if s.is_prune_event(t)]
    assert prune_events == [3, 6, 9, 10]            # off the grid, tf is still an event
    for t in prune_events:
        expected = 0.9 + (0.0 - 0.9) * (1 - t / 10) ** 3
        assert s.sparsity_at(t) == pytest.approx(expected, abs=1e-15)
    assert s.sparsity_at(10) == 0.9                  # exactly s_f
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(15) == 0.9
    lin = make_schedule(shape="linear", initial_sparsity=0.2)
    assert lin.sparsity_at(4) == pytest.approx(0.9 + (0.2 - 0.9) * 0.6)


def test_regrowth_events_and_fraction():
    s = make_schedule()
    # every pruning event, then every `every` steps until the last step, never at t = T
    assert [t for t in range(1, 21) if s.is_regrow_event(t)] == [3, 6, 9, 10, 12, 15, 18]
    assert [t for t in range(1, 21) if make_schedule(regrow_until=10).is_regrow_event(t)] == [3, 6, 9, 10]
    assert not any(make_schedule(regrow="none").is_regrow_event(t) for t in range(21))
    assert make_schedule(end=20).is_prune_event(20) and not make_schedule(end=20).is_regrow_event(20)
    for t in (0, 5, 13, 20):
        assert s.regrow_fraction(t) == pytest.approx(0.005 + 0.495 * (1 + math.cos(math.pi * t / 20)) / 2)


def spec(**fields):
    return parse_spec({"passes": [{"kind": "prune_regrow", **fields}]}).passes[0]


def test_resolve_fractions_and_steps():
    s = resolve_schedule(spec(final_sparsity=0.8, schedule={"start": 0.1, "end": 0.7, "every": 5}), 100)
    assert (s.start, s.end, s.every, s.regrow_until) == (10, 70, 5, 100)
    s = resolve_schedule(spec(final_sparsity=0.8, schedule={"start": 3, "end": 0.5, "every": 5},
                              regrow_until="schedule_end"), 100)
    assert (s.start, s.end, s.regrow_until) == (3, 50, 50)
    with pytest.raises(FxgrowError, match="past the end"):
        resolve_schedule(spec(final_sparsity=0.8, schedule={"end": 200, "every": 5}), 100)
    with pytest.raises(FxgrowError, match="one shot"):
        resolve_schedule(spec(final_sparsity=0.8), 100)   # every: 1000 in a 70-step window
    with pytest.raises(FxgrowError, match="no mask update"):
        resolve_schedule(spec(final_sparsity=0.8, preset="rigl"), 100)  # every: 1000, constant sparsity
    with pytest.raises(FxgrowError, match="must come before"):
        resolve_schedule(spec(final_sparsity=0.8, schedule={"start": 60, "end": 0.5, "every": 5}), 100)


# --- spec errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("fields, path", [
    ({"final_sparsity": 1.0}, "passes.0.final_sparsity"),
    ({"final_sparsity": -0.1}, "passes.0.final_sparsity"),
    ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, "passes.0.initial_sparsity"),
    ({"final_sparsity": 0.5, "schedule": {"start": 0.5, "end": 0.5}}, "passes.0.schedule"),
    ({"final_sparsity": 0.5, "schedule": {"start": 10, "end": 5}}, "passes.0.schedule"),
    ({"final_sparsity": 0.5, "schedule": {"end": 1.5}}, "passes.0.schedule.end"),
    ({"final_sparsity": 0.5, "schedule": {"every": 0}}, "passes.0.schedule.every"),
    ({"final_sparsity": 0.5, "schedule": {"every": -3}}, "passes.0.schedule.every"),
    ({"final_sparsity": 0.5, "preset": "gmp", "regrow": "gradient"}, "passes.0.regrow"),
    ({"final_sparsity": 0.5, "preset": "rigl", "initial_sparsity": 0.0}, "passes.0.initial_sparsity"),
    ({"final_sparsity": 0.5, "preset": "granet_uniform", "scope": "global"}, "passes.0.scope"),
    ({"final_sparsity": 0.5, "preset": "rigl", "regrow_fraction": {"over": "training"}}, "passes.0.regrow_fraction"),
    ({"final_sparsity": 0.5, "erk_power_scale": -1}, "passes.0.erk_power_scale"),
    ({"final_sparsity": 0.5, "init_distribution": "rer"}, "passes.0.init_distribution"),
    ({"final_sparsity": 0.5, "classifier_density": {}}, "passes.0.classifier_density"),  # needs scope: layer
    ({"final_sparsity": 0.5, "regrow": "momentum", "granularity": "filter"}, "passes.0.granularity"),
    ({"final_sparsity": 0.5, "momentum": {"beta": 1.0}}, "passes.0.momentum.beta"),
    ({"final_sparsity": 0.5, "preset": "set", "regrow_fraction": {"initial": 0.5}}, "passes.0.regrow_fraction"),
    ({"final_sparsity": 0.5, "preset": "magic"}, "passes.0.preset"),
    ({"final_sparsity": 0.5, "scope": "row"}, "passes.0.scope"),
    ({"final_sparsity": 0.5, "preset": ["gmp"]}, "passes.0.preset"),
])
def test_bad_input_names_the_field(fields, path):
    with pytest.raises(SpecError) as e:
        spec(**fields)
    assert path in [loc for loc, _ in e.value.errors], e.value.errors


def test_schedule_past_the_end_with_known_steps():
    with pytest.raises(SpecError) as e:
        parse_spec({"passes": [{"kind": "prune_regrow", "final_sparsity": 0.5,
                                "schedule": {"end": 500, "every": 10}}], "train": {"steps": 100}})
    assert "passes.0.schedule" in [loc for loc, _ in e.value.errors]


@pytest.mark.parametrize("preset, expect", [
    ("granet", {"initial_sparsity": 0.0, "regrow": "gradient"}),
    ("granet_sparse", {"initial_sparsity": 0.5, "init_distribution": "erk", "regrow": "gradient"}),
    ("gmp", {"initial_sparsity": 0.0, "regrow": "none"}),
    ("rigl", {"initial_sparsity": 0.9, "init_distribution": "erk", "regrow": "gradient",
              "regrow_until": "schedule_end"}),
    ("set", {"initial_sparsity": 0.9, "init_distribution": "erk", "regrow": "random"}),
])
def test_presets_expand(preset, expect):
    s = spec(final_sparsity=0.9, preset=preset, schedule={"every": 50})
    assert {k: getattr(s, k) for k in expect} == expect
    assert s.schedule.every == 50  # fields a preset does not fix stay free
    assert spec(final_sparsity=0.9, preset=preset, schedule={"every": 50}, **expect) == s  # agreeing is fine


@pytest.mark.parametrize("preset", ["rigl", "set"])
def test_constant_sparsity_presets_hold_the_default_final_sparsity(preset):
    s = spec(preset=preset)  # no final_sparsity given: the default applies to both ends
    assert s.initial_sparsity == s.final_sparsity == type(s).model_fields["final_sparsity"].default


# --- ERK -------------------------------------------------------------------------------------

def test_erk_densities_hand_computed():
    # raw (sum/prod): conv 4x2x3x3 -> 12/72 = 1/6; linear 10x10 -> 20/100 = 1/5; linear 2x10 -> 12/20 = 3/5.
    shapes = [(4, 2, 3, 3), (10, 10), (2, 10)]
    # density 0.5 of 192 -> 96 kept. eps*(72/6 + 100/5 + 20*3/5) = eps*44 = 96 -> eps = 24/11:
    # the last layer would get 3/5 * 24/11 = 1.31 > 1: dense (20 kept), then eps*32 = 76 -> eps = 19/8.
    d = erk_densities(shapes, 0.5)
    assert d == pytest.approx([19 / 48, 19 / 40, 1.0])
    assert sum(n * x for n, x in zip((72, 100, 20), d)) == pytest.approx(96)
    assert layout_counts(shapes, 0.5, "erk") == [29, 47, 20]   # 28.5 and 47.5 rounded by remainder, sum 96
    assert layout_counts(shapes, 0.5, "uniform") == [36, 50, 10]


def test_allocate_counts_is_exact():
    counts = allocate_counts([7, 7, 7], [1 / 3] * 3, 7)
    assert sum(counts) == 7 and all(c in (2, 3) for c in counts)


# --- the rewrite ---------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", SMALL_ZOO, ids=[e.name for e in SMALL_ZOO])
def test_dense_start_preserves_computation(entry):
    model = entry.build().eval()
    x = entry.example()
    gm, _ = prune(model, x, final_sparsity=0.8)
    gm.eval()
    assert torch.equal(gm(x), model(x))
    assert len(masks(gm)) == len([n for n in gm.graph.nodes if n.op == "call_module"
                                  and isinstance(gm.get_submodule(n.target), MaskProducer)])
    assert all(w.nnz() == w.numel for w in masked_weights(gm))
    gm.graph.lint()


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_sparse_start_layout_is_exact_and_zeroed(distribution):
    gm, _ = prune(MLP(), final_sparsity=0.9, initial_sparsity=0.5, init_distribution=distribution)
    ws = masked_weights(gm)
    assert [w.nnz() for w in ws] == layout_counts([w.mask.shape for w in ws], 0.5, distribution)
    for w in ws:
        assert torch.all(w.param[~w.active] == 0)


def test_fold_gives_exact_zeros_and_same_outputs():
    model = ResNetTiny(in_ch=1)
    x = torch.randn(2, 1, 8, 8)
    gm, _ = prune(model, x, final_sparsity=0.7, initial_sparsity=0.7, init_distribution="uniform")
    gm.eval()
    folded = fold(gm).eval()
    assert torch.equal(folded(x), gm(x))
    state = folded.state_dict()
    for w in masked_weights(gm):
        assert int((state[w.key] == 0).sum()) >= w.numel - w.nnz()
    ResNetTiny(in_ch=1).load_state_dict(state)


def test_one_prune_pass_per_model():
    with pytest.raises(Exception, match="one prune_regrow pass"):
        compose(PruneRegrowPass(final_sparsity=0.5, targets={"names": ["fc1"]}),
                PruneRegrowPass(final_sparsity=0.5, targets={"names": ["head"]}))(MLP())


# --- pruning -------------------------------------------------------------------------------

def two_layer_net():
    """fc1 (4x3) and fc2 (2x4) with distinct hand-set magnitudes."""
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(1, 13, dtype=torch.float32).view(4, 3) * torch.tensor([1, -1, 1]))
        net[1].weight.copy_(torch.arange(1, 9, dtype=torch.float32).view(2, 4) * 3)
    return net


def test_global_scope_keeps_the_largest_overall():
    gm, _ = prune(two_layer_net(), final_sparsity=0.5)
    ws = masked_weights(gm)
    assert prune_global(ws, 10) == 10
    values = torch.cat([w.param.detach().abs().flatten() for w in ws])  # pruned ones are zero now
    all_values = torch.cat([torch.arange(1, 13.), torch.arange(1, 9.) * 3])
    threshold = all_values.sort(descending=True).values[9]
    kept = torch.cat([w.active.flatten() for w in ws])
    assert torch.equal(kept, all_values >= threshold)
    assert torch.equal(values[~kept], torch.zeros(10))
    assert [w.nnz() for w in ws] == [4, 6]   # global: the layers end at different sparsities


def test_layer_scope_keeps_the_largest_per_layer():
    gm, _ = prune(two_layer_net(), final_sparsity=0.5, scope="layer")
    ws = masked_weights(gm)
    for w, keep in zip(ws, (6, 4)):
        ref = w.param.detach().abs().flatten().clone()
        prune_layer(w, keep)
        assert w.nnz() == keep
        assert torch.equal(w.active.flatten(), ref >= ref.sort(descending=True).values[keep - 1])


def test_masked_positions_get_zero_gradient_and_stay_zero():
    for optimizer in ("sgd", "adamw"):
        gm, cbs = prune(MLP(), final_sparsity=0.8, initial_sparsity=0.6, init_distribution="uniform",
                        regrow="none", schedule={"start": 0, "end": 4, "every": 2})
        loop = Loop(gm, cbs, total_steps=6, optimizer=optimizer)
        loop.run(until=3)
        ws = masked_weights(gm)
        loop.optimizer.zero_grad()
        F.cross_entropy(gm(loop.data(99)[0]), loop.data(99)[1]).backward()
        for w in ws:
            assert torch.all(w.param.grad[~w.active] == 0)
            assert torch.all(w.param[~w.active] == 0)
        loop.run(start=False)
        for w in ws:
            assert torch.all(w.param[~w.active] == 0)
            for state in loop.optimizer.state[w.param].values():
                if state.shape == w.param.shape:
                    assert torch.all(state[~w.active] == 0)


# --- regrowth ------------------------------------------------------------------------------

def test_regrowth_moves_the_dropped_count_to_the_largest_gradients():
    gm, _ = prune(two_layer_net(), final_sparsity=0.5, scope="layer")
    w = masked_weights(gm)[0]                       # |w| = 1..12 in row-major order
    prune_layer(w, 8)                               # keeps 5..12; 1..4 pruned (zero)
    opt = torch.optim.SGD([w.param], lr=0.1, momentum=0.9)
    opt.state[w.param]["momentum_buffer"] = torch.full_like(w.param, 7.0)
    before = w.param.detach().clone()
    grad = torch.zeros(12)
    grad[[0, 2, 3, 5, 11]] = torch.tensor([-9.0, 8.0, 0.5, 3.0, 100.0])  # 11 is active: not a candidate
    # r = 0.25 of 8 active -> drop 2: the two smallest active are |w| = 5 and 6 (positions 4, 5)
    dropped, moved = regrow(w, 0.25, grad.view(4, 3), optimizer=opt)
    assert dropped == 2
    active = w.active.flatten()
    # candidates: 0..5 (0..3 pruned before, 4..5 just dropped); largest |g|: position 0 (9) and 2 (8)
    assert active.tolist() == [True, False, True, False, False, False] + [True] * 6
    assert moved == 2 and w.nnz() == 8
    p, m = w.param.detach().flatten(), opt.state[w.param]["momentum_buffer"].flatten()
    assert p[[0, 2]].tolist() == [0.0, 0.0] and m[[0, 2]].tolist() == [0.0, 0.0]   # regrown: zero
    assert p[[4, 5]].tolist() == [0.0, 0.0] and m[[4, 5]].tolist() == [0.0, 0.0]   # dropped: zero
    assert torch.equal(p[6:], before.flatten()[6:]) and torch.all(m[6:] == 7.0)  # the rest untouched


def test_dropped_and_regrown_keeps_its_value():
    gm, _ = prune(two_layer_net(), final_sparsity=0.5)
    w = masked_weights(gm)[1]                       # fully dense: every candidate is a just-dropped one
    before = w.param.detach().clone()
    dropped, moved = regrow(w, 0.5, torch.ones(2, 4))
    assert (dropped, moved) == (4, 0) and w.nnz() == 8
    assert torch.equal(w.param.detach(), before)


def test_random_regrowth_is_seeded():
    def run(seed):
        torch.manual_seed(0)  # same weights: only the generator may differ
        gm, _ = prune(MLP(), final_sparsity=0.8, initial_sparsity=0.8, init_distribution="uniform")
        w = masked_weights(gm)[0]
        regrow(w, 0.3, None, torch.Generator().manual_seed(seed))
        return w.mask.clone()
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_drop_count_is_the_ceiling_without_float_noise():
    assert drop_count(0.005, 1000) == 5 and drop_count(0.005, 1001) == 6 and drop_count(0.3, 0) == 0


# --- the callback in a loop ----------------------------------------------------------------------------

def test_dense_gradient_is_captured_only_on_event_steps():
    gm, cbs = prune(MLP(), final_sparsity=0.5, schedule={"start": 0, "end": 6, "every": 3})
    captured = {}

    class Spy:
        name = "spy"
        def __getattr__(self, hook):   # no-op for every other hook
            return lambda *a, **k: None
        def after_backward(self, ctx):
            grads = [m.dense_grad for m in ctx.model.modules() if isinstance(m, MaskProducer)]
            captured[ctx.step + 1] = grads if all(g is not None for g in grads) else None
            if grads[0] is not None:  # the dense gradient is dL/d(effective weight)
                x, y = ctx.batch
                w = masked_weights(ctx.model)[0]
                eff = (w.param * w.mask).detach().requires_grad_()
                h = F.linear(x.flatten(1), eff, ctx.model.fc1.bias)
                rest = ctx.model.head(torch.relu(ctx.model.fc2(torch.relu(h))))
                ref, = torch.autograd.grad(F.cross_entropy(rest, y), eff)
                torch.testing.assert_close(grads[0], ref)

    Loop(gm, [cbs[0], Spy()], total_steps=8).run()
    assert {t for t, g in captured.items() if g is not None} == {3, 6}
    assert all(not m.capture and m.dense_grad is None for m in gm.modules() if isinstance(m, MaskProducer))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparsity_follows_the_schedule_at_every_event(scope):
    gm, cbs = prune(MLP(), final_sparsity=0.9, scope=scope, schedule={"start": 2, "end": 17, "every": 4})
    loop = Loop(gm, cbs, total_steps=24).run()
    sched = cbs[0].schedule
    events = [r for r in loop.records]
    assert [r["step"] for r in events] == sched.events() == [6, 10, 14, 17, 18, 22]
    sizes = {w.key: w.numel for w in masked_weights(gm)}
    n = sum(sizes.values())
    for r in events:
        target = sched.sparsity_at(r["step"])
        assert r["prune_regrow/target_sparsity"] == target
        if scope == "global":
            assert r["prune_regrow/actual_sparsity"] == pytest.approx(round(target * n) / n, abs=1e-12)
        else:
            for key, s in r["prune_regrow/layers"].items():
                assert s == pytest.approx(round(target * sizes[key]) / sizes[key], abs=1e-12)
        assert r["prune_regrow/dropped"] >= r["prune_regrow/moved"] >= 0
    assert events[-1]["prune_regrow/target_sparsity"] == 0.9
    report = cbs[0].report()
    assert report["final_sparsity"] == 0.9 and report["events"] == 6
    assert report["actual_sparsity"] == pytest.approx(0.9, abs=1 / n if scope == "global" else 0.01)
    assert set(report["layers"]) == set(sizes)


def test_rigl_keeps_the_erk_layout_counts_while_moving_weights():
    gm, cbs = prune(MLP(), final_sparsity=0.8, preset="rigl", schedule={"every": 3}, scope="layer")
    counts = [w.nnz() for w in masked_weights(gm)]
    before = [w.mask.clone() for w in masked_weights(gm)]
    loop = Loop(gm, cbs, total_steps=12).run()
    assert [w.nnz() for w in masked_weights(gm)] == counts
    assert sum(r["prune_regrow/moved"] for r in loop.records) > 0
    assert any(not torch.equal(b, w.mask) for b, w in zip(before, masked_weights(gm)))
    assert all(r["prune_regrow/pruned"] == 0 for r in loop.records)


def test_broken_invariant_fails_loudly():
    gm, cbs = prune(MLP(), final_sparsity=0.5, regrow="none", schedule={"start": 0, "end": 4, "every": 2})
    loop = Loop(gm, cbs, total_steps=6).run(until=2)
    masked_weights(gm)[0].mask.fill_(0)  # weights lost behind the schedule's back: pruning cannot add
    with pytest.raises(FxgrowError, match="active"):
        loop.run(start=False)


# --- the real loop on digits ----------------------------------------------------------------------

def train_digits(tmp_path, name, passes=(), epochs=8):
    import json

    from fxgrow.specs.train import TrainSpec
    from fxgrow.train import Trainer
    from examples.models.small_cnn import build

    torch.manual_seed(0)
    model, callbacks = build(), []
    if passes:
        result = compose(*passes)(model)
        model, callbacks = result.graph_module, result.callbacks
    spec = TrainSpec(data="digits", epochs=epochs, batch_size=64, optimizer={"lr": 0.05},
                     schedule={"warmup_epochs": 1}, progress="none")
    trainer = Trainer(model, spec, callbacks, out_dir=tmp_path / name)
    report = trainer.fit()
    metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, report, metrics


@pytest.fixture
def one_thread():
    """Two runs of a small CNN: one thread avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digits_at_90_percent_sparsity_stays_within_3_points_of_dense(tmp_path, one_thread):
    _, dense, _ = train_digits(tmp_path, "dense")
    trainer, sparse, metrics = train_digits(tmp_path, "granet", [PruneRegrowPass(
        preset="granet", final_sparsity=0.9, schedule={"start": 0.0, "end": 0.6, "every": 8})])
    print(f"digits accuracy: dense {dense['accuracy']:.4f}, GraNet 90% {sparse['accuracy']:.4f}")
    assert sparse["accuracy"] >= dense["accuracy"] - 0.03
    section = sparse["prune_regrow"]
    n = sum(w.numel for w in masked_weights(trainer.model))
    assert section["final_sparsity"] == 0.9
    assert section["actual_sparsity"] == pytest.approx(round(0.9 * n) / n, abs=1e-12)
    assert set(section["layers"]) == {"0.weight", "3.weight", "7.weight", "12.weight"}
    events = [r for r in metrics if "prune_regrow/target_sparsity" in r]
    assert len(events) == section["events"] == len(trainer.callbacks[0].schedule.events())
    assert events[-1]["prune_regrow/target_sparsity"] == 0.9 and section["moved"] > 0
    folded = fold(trainer.model).eval()
    zeros = sum(int((folded.state_dict()[k] == 0).sum()) for k in section["layers"])
    assert zeros >= round(0.9 * n)
    assert trainer.evaluate(folded)["accuracy"] == sparse["accuracy"]


# --- filter granularity -------------------------------------------------------------------------

def filter_pruned(model, x, **fields):
    fields = {"final_sparsity": 0.5, "granularity": "filter", "schedule": {"start": 0, "end": 4, "every": 2},
              **fields}
    return prune(model, x, **fields)


def channel_state(gm, x):
    """{coupling group id: {(layer, param, dim): per-channel 'all zero' flags}} over masked weights."""
    from fxgrow.analysis import channel_groups, propagate_shapes
    from fxgrow.nn.mask import MaskProducer

    masks = {m.source: m.mask for m in gm.modules() if isinstance(m, MaskProducer)}
    propagate_shapes(gm, x)
    out = {}
    for g in channel_groups(gm):
        for u in g.uses:
            key = f"{u.layer}.{u.param}"
            if key in masks and not g.fixed:
                m = masks[key].movedim(u.dim, 0).narrow(0, u.offset, g.size * u.repeat).reshape(g.size, -1)
                out.setdefault(g.id, {})[(u.layer, u.dim)] = (m == 0).all(1)
    return out


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_filter_pruning_moves_coupled_channels_together_on_a_residual_net(scope):
    x = torch.randn(4, 3, 8, 8)
    gm, cbs = filter_pruned(ResNetTiny(), x, scope=scope, final_sparsity=0.5)
    Loop(gm, cbs, total_steps=6, in_shape=(3, 8, 8)).run()
    state = channel_state(gm, x)
    residual = next(g for g in state.values() if ("layer1.0.conv2", 0) in g)
    assert {k for k in residual} >= {("conv1", 0), ("layer1.0.conv2", 0), ("layer1.1.conv2", 0),
                                     ("layer1.0.conv1", 1), ("layer2.0.conv1", 1), ("layer2.0.shortcut.0", 1)}
    for slices in state.values():
        flags = list(slices.values())
        assert all(torch.equal(f, flags[0]) for f in flags)       # a channel is gone everywhere or nowhere
        assert 0 < int((~flags[0]).sum())                          # every group keeps a channel
    report = cbs[0].report()
    total = sum(len(next(iter(s.values()))) for s in state.values())
    pruned = sum(int(next(iter(s.values())).sum()) for s in state.values())
    if scope == "layer":
        assert all(int(next(iter(s.values())).sum()) == round(0.5 * len(next(iter(s.values()))))
                   for s in state.values())
    else:
        assert pruned == round(0.5 * total)
    assert report["actual_sparsity"] == pytest.approx(pruned / total)
    assert report["weight_sparsity"] > 0.5 and set(report["channels"]) == {str(k) for k in state}


@pytest.mark.parametrize("build, shape", [(ResNetTiny, (3, 8, 8)), (MLP, (1, 8, 8)), (Depthwise, (3, 8, 8))],
                         ids=["resnet_tiny", "mlp", "depthwise"])
def test_filter_export_is_physically_smaller_with_the_same_outputs(build, shape):
    from fxgrow.passes.prune_regrow_filters import export_pruned

    x = torch.randn(4, *shape)
    gm, cbs = filter_pruned(build(), x, final_sparsity=0.6, regrow="random")
    Loop(gm, cbs, total_steps=6, in_shape=shape).run()
    gm.eval()
    small = export_pruned(gm, x).eval()
    torch.testing.assert_close(small(x), gm(x), rtol=1e-5, atol=1e-5)
    n_small = sum(p.numel() for p in small.parameters())
    n_full = sum(p.numel() for n, p in gm.named_parameters())
    assert n_small < 0.75 * n_full
    assert not any(isinstance(m, MaskProducer) for m in small.modules())


def test_filter_regrowth_moves_whole_channels_and_keeps_counts():
    x = torch.randn(4, 1, 8, 8)
    gm, cbs = filter_pruned(MLP(), x, final_sparsity=0.5, scope="layer",
                            schedule={"start": 0, "end": 2, "every": 2})
    loop = Loop(gm, cbs, total_steps=12).run()
    assert sum(r["prune_regrow/moved"] for r in loop.records) > 0
    for slices in channel_state(gm, x).values():
        flags = list(slices.values())
        assert all(torch.equal(f, flags[0]) for f in flags) and int(flags[0].sum()) == 16


def test_filter_granularity_errors_name_the_field():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    with pytest.raises(SpecError) as e:
        filter_pruned(Grouped(), torch.randn(2, 4, 8, 8))
    assert e.value.errors[0][0] == "passes.0.granularity" and "'conv'" in e.value.errors[0][1]
    with pytest.raises(SpecError) as e:
        filter_pruned(MLP(), None)
    assert e.value.errors[0][0] == "passes.0.granularity"
    with pytest.raises(SpecError) as e:
        spec(final_sparsity=0.9, initial_sparsity=0.5, granularity="filter")
    assert e.value.errors[0][0] == "passes.0.granularity"


# --- stacked with other producers -------------------------------------------------------------------

@pytest.mark.parametrize("before", [["template_mixing"], ["template_mixing", "compander"], ["compander"]])
def test_stacked_after_other_producers(before):
    from fxgrow.ir import evaluate_chain, weight_chains
    from fxgrow.passes import PASS_REGISTRY

    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(0)
    earlier = [PASS_REGISTRY[kind]() for kind in before]
    reference = compose(*earlier)(MLP(), example_input=x).graph_module
    torch.manual_seed(0)
    result = compose(*earlier, PruneRegrowPass(final_sparsity=0.8, schedule={"start": 0, "end": 4, "every": 2}))(
        MLP(), example_input=x)
    gm = result.graph_module
    assert torch.equal(gm(x), reference(x))              # all-ones masks change nothing
    ours = [cb for cb in result.callbacks if cb.name == "prune_regrow"]
    Loop(gm, ours, total_steps=6).run()
    chains = weight_chains(gm)
    n = sum(w.numel for w in masked_weights(gm))
    assert ours[0].report()["actual_sparsity"] == pytest.approx(round(0.8 * n) / n, abs=1e-12)
    for w in masked_weights(gm):
        assert [type(m).__name__ for m in w.before] == [
            {"template_mixing": "MixProducer", "compander": "CompandProducer"}[k] for k in before]
        assert torch.all(evaluate_chain(gm, chains[w.key])[~w.active] == 0)
        # the compander's v is zeroed itself (psi(0) = 0); mixed templates are shared, never zeroed
        assert w.zeroable == ("template_mixing" not in before)
        if w.zeroable:
            assert torch.all(w.param[~w.active] == 0)
    folded = fold(gm).eval()
    gm.eval()
    torch.testing.assert_close(folded(x), gm(x))


def test_a_run_killed_and_resumed_continues_the_schedule_exactly(tmp_path, one_thread):
    from fxgrow.specs.train import TrainSpec
    from fxgrow.train import Callback, Trainer
    from examples.models.small_cnn import build

    class Crash(Callback):
        name = "crash"

        def after_step(self, ctx):
            if ctx.step == 27:  # between the checkpoint at 20 and the events at 30 and 35
                raise KeyboardInterrupt

    def run(name, extra=(), resume=None):
        torch.manual_seed(0)
        result = PruneRegrowPass(final_sparsity=0.8, schedule={"start": 0, "end": 30, "every": 5})(build())
        spec = TrainSpec(data="digits", steps=40, batch_size=64, checkpoint_every_steps=20, progress="none")
        trainer = Trainer(result.graph_module, spec, result.callbacks + list(extra), out_dir=tmp_path / name,
                          resume=resume)
        return trainer, trainer.fit()

    straight, report = run("straight")
    with pytest.raises(KeyboardInterrupt):
        run("resumed", [Crash()])
    resumed, again = run("resumed", resume=tmp_path / "resumed")
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert again["prune_regrow"] == report["prune_regrow"] and report["prune_regrow"]["events"] == 7

    def events(name):
        return [line for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "prune_regrow" in line]
    assert events("resumed") == events("straight")


@pytest.mark.slow
def test_compiled_training_captures_the_dense_gradient(tmp_path, one_thread):
    """torch.compile: capture steps and ordinary steps compile to two cached graphs."""
    from fxgrow.specs.train import TrainSpec
    from fxgrow.train import Trainer
    from examples.models.small_cnn import build

    result = PruneRegrowPass(final_sparsity=0.8, schedule={"start": 0, "end": 20, "every": 5})(build())
    spec = TrainSpec(data="digits", steps=30, batch_size=64, compile=True, progress="none")
    report = Trainer(result.graph_module, spec, result.callbacks, out_dir=tmp_path).fit()
    section = report["prune_regrow"]
    assert section["events"] == 5 and section["moved"] > 0
    assert section["actual_sparsity"] == pytest.approx(0.8, abs=1e-4)


def test_slicing_after_the_masks_trains_sub_models_of_the_sparse_net(tmp_path, one_thread):
    from fxgrow.ir import evaluate_chain, weight_chains
    from fxgrow.passes.sorted_slicing import SortedSlicingPass
    from fxgrow.specs.train import TrainSpec
    from fxgrow.train import Trainer
    from examples.models.small_cnn import build

    x = torch.randn(2, 1, 8, 8)
    result = compose(PruneRegrowPass(final_sparsity=0.8, schedule={"start": 0, "end": 15, "every": 5}),
                     SortedSlicingPass(width={"fractions": [0.5, 1.0]}))(build(width=8), example_input=x)
    gm = result.graph_module
    for w in masked_weights(gm):   # the mask sits before the slice in every chain
        assert [type(m).__name__ for m in weight_chains(gm)[w.key].modules(gm)] == ["MaskProducer", "SliceProducer"]
    spec = TrainSpec(data="digits", steps=20, batch_size=64, progress="none", eval_every_epochs=None)
    report = Trainer(gm, spec, result.callbacks, out_dir=tmp_path).fit()
    n = sum(w.numel for w in masked_weights(gm))
    assert report["prune_regrow"]["events"] == 3 and report["prune_regrow"]["moved"] > 0  # at steps 5, 10, 15
    assert report["prune_regrow"]["actual_sparsity"] == pytest.approx(round(0.8 * n) / n, abs=1e-12)
    chains = weight_chains(gm)
    for w in masked_weights(gm):
        assert torch.all(evaluate_chain(gm, chains[w.key])[~w.active] == 0)
    assert "sorted_slicing" in report


def test_gradient_regrowth_leaves_blocks_no_sub_model_ran(one_thread):
    """Depth sub-models skip whole residual blocks: a step that ran none of a block gives
    its masks no dense gradient, and they stay as they are while the others regrow."""
    from fxgrow.passes.sorted_slicing import SortedSlicingPass
    from fxgrow.subnets import subnet

    x = torch.randn(4, 3, 8, 8)
    result = compose(PruneRegrowPass(initial_sparsity=0.5, final_sparsity=0.5, init_distribution="uniform",
                                     schedule={"start": 0, "end": 10, "every": 2}),
                     SortedSlicingPass(depth={"blocks": [0, 3]}))(ResNetTiny(), example_input=x)
    gm, (callback, _) = result.graph_module, result.callbacks

    class Ctx:
        model, optimizer, seed, total_steps, step = gm, None, 0, 10, 1
    callback.on_train_start(Ctx)
    callback.on_step_start(Ctx)  # step 2 ends in a regrowth: capture on
    with subnet(gm, depth=0):
        gm(x).sum().backward()
    before = {w.key: w.mask.clone() for w in masked_weights(gm)}
    record = callback.event(Ctx, 2)
    assert record["moved"] > 0
    for w in masked_weights(gm):
        in_block = w.key.startswith(("layer1.", "layer2.1."))  # the 3 blocks depth 0 drops
        assert torch.equal(w.mask, before[w.key]) == in_block, w.key
