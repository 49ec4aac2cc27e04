"""The compander's issue-16 fixes at hand-made cases: no weight starts frozen, Adam without
the correction is named, learnable a and b stay positive."""
import math
import warnings

import pytest
import torch

from fxgrow.nn.compander import psi_prime
from fxgrow.passes.compander_callback import compand_sites
from tests.test_compander_callback import Loop, mlp_loss, rewritten
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)
from tests.zoo import MLP

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_weight(min_slope: float, steps: int = 300):
    """fc1.weight[0, 0] = 1.2, beyond a * pi / 2 = 1.0996 for a = 0.7: its start, its value
    after `steps` SGD steps, its start slope, and the callback."""
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[0, 0] = 1.2
    with pytest.warns(UserWarning, match="1 of 2048 weights of 'fc1.weight' start at"):
        gm, cb = rewritten(model, min_slope=min_slope)
    site = compand_sites(gm)[0]
    with torch.no_grad():
        start = float(site.producer(site.v())[0, 0])
        slope = float(psi_prime(site.v()[0, 0], 0.7, 0.8, "atan") / (0.7 / 0.8))
    loop = Loop(gm, cb, torch.optim.SGD, lr=0.05)
    for i in range(steps):
        loop.train_step(lambda m: mlp_loss(m, seed=i))
    cb.on_train_end(loop)
    with torch.no_grad():
        return start, float(site.producer(site.v())[0, 0]), slope, cb


def test_a_weight_beyond_psis_range_starts_where_it_can_train():
    start, end, slope, cb = trained_weight(min_slope=0.1)
    assert start == pytest.approx(0.7 * math.atan(3), abs=1e-6) == pytest.approx(0.874332, abs=1e-6)
    assert slope == pytest.approx(0.1)
    report = cb.report()
    assert report["clamped"]["fc1.weight"] == 1
    assert report["clamped_start_shift"]["fc1.weight"] == pytest.approx(1.2 - start, abs=1e-6)
    moved = report["clamped_moved_in_training"]["fc1.weight"]
    assert moved["max"] == pytest.approx(abs(end - start), abs=1e-6) and moved["max"] > 1e-5
    # the old start, psi's range edge (u = 1000): psi' ~ 1e-6 of its peak, and the weight stays put
    old_start, old_end, old_slope, _ = trained_weight(min_slope=1e-6)
    assert old_start == pytest.approx(0.7 * math.atan(1000), abs=1e-6) and old_slope < 1e-5
    assert abs(old_end - old_start) < 1e-3 * moved["max"]


@pytest.mark.parametrize("optimizer, fields, warns", [
    (torch.optim.AdamW, {}, True),
    (torch.optim.Adam, {"learnable": "layer"}, True),
    (torch.optim.AdamW, {"adaptive_fix": True}, False),
    (torch.optim.SGD, {}, False),
])
def test_adam_without_the_correction_is_named(optimizer, fields, warns):
    gm, cb = rewritten(**fields)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Loop(gm, cb, optimizer, lr=1e-3)
    said = [w for w in caught if "without adaptive_fix" in str(w.message)]
    assert bool(said) == warns


@pytest.mark.parametrize("learnable", ["layer", "global"])
def test_learnable_a_and_b_stay_positive(learnable):
    """A loss pushing every b (and a) negative at lr 10: without the projection b = 1 - 10 * 100
    and every weight would flip sign; with it b stops at 1e-3 of its start and the signs stay."""
    gm, cb = rewritten(learnable=learnable)
    sites = compand_sites(gm)
    scales = list({id(s.producer.scale): s.producer.scale for s in sites}.values())
    before = [torch.sign(s.producer(s.v())).detach() for s in sites]
    loop = Loop(gm, cb, torch.optim.SGD, lr=10.0)
    loop.train_step(lambda m: 100 * sum(s.a + s.b for s in scales) + 0 * mlp_loss(m))
    for s in scales:
        assert float(s.a.detach()) == pytest.approx(0.5e-3) and float(s.b.detach()) == pytest.approx(1e-3)
    for s, sign in zip(sites, before):
        assert torch.equal(torch.sign(s.producer(s.v())), sign)
    assert cb.report()["scale_projections"] == 2 * len(scales)
