"""Growth: block placement, widths, per-channel tensors, layouts, coefficients, bad input.
(The training-loop tests are in test_grow_train.py.)"""
import math

import pytest
import torch
from torch import nn

from fxgrow.errors import FxgrowError, PassError, SpecError
from fxgrow.fold import fold
from fxgrow.ir import insert_producer, weight_chains
from fxgrow.nn.base import Producer
from fxgrow.nn.compander import CompanderScale, CompandProducer
from fxgrow.passes import Pipeline
from fxgrow.passes.grow import GrowCallback, GrowPass
from fxgrow.passes.grow_model import grow_model, load_source, surviving_params
from fxgrow.passes.template_mixing import TemplateMixingPass, mix_producers
from fxgrow.specs import parse_spec
from fxgrow.train.checkpoint import save_checkpoint
from tests.zoo import SMALL_ZOO, ZOO, ConvBN, MLP, ResNetTiny

AT = {"epoch": 1}


class CatNet(nn.Module):
    """Two branches concatenated along channels, then flattened into the classifier:
    the grown channel order is not band-major there."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(torch.flatten(torch.relu(self.c(x)), 1))


GROWABLE = [e for e in SMALL_ZOO if e.name != "transformer"] + [
    pytest.param(e, id=e.name, marks=pytest.mark.slow) for e in ZOO if e not in SMALL_ZOO]
CAT_INPUT = (1, 1, 8, 8)


def ids(entries):
    return [getattr(e, "name", None) for e in entries]


def source(model, x, seed, **fields):
    """A template-mixed net with non-trivial biases and norm statistics (as if trained)."""
    return trained_like(TemplateMixingPass(**fields)(model, x, seed=seed).graph_module, seed)


def trained_like(gm, seed):
    """Random biases, norm parameters and statistics, in eval mode."""
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, t in gm.state_dict().items():
            if name.endswith(("bias", "running_mean")) or (name.endswith("weight") and t.dim() == 1):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return gm.eval()


def sources(build, x, n=2, **fields):
    return [source(build(), x, seed, **fields) for seed in range(n)]


def grow(nets, x, factor=2, **kw):
    new, info = grow_model(nets[0], [n.state_dict() for n in nets], factor, x, **kw)
    return new.eval(), info


# --- block placement -----------------------------------------------------------------------

@pytest.mark.parametrize("entry", GROWABLE, ids=ids(GROWABLE))
def test_fused_net_sums_the_sources_logits(entry):
    """Off-diagonal alphas zeroed (test-only setting): the grown net computes the two
    source nets side by side, and the classifier adds their logits."""
    x = entry.example(batch=4)
    nets = sources(entry.build, x)
    new, _ = grow(nets, x, new_coefficients="zero")
    torch.testing.assert_close(new(x), nets[0](x) + nets[1](x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fold(new)(x), new(x), rtol=1e-6, atol=1e-6)


def test_fusion_through_concat_and_flatten():
    x = torch.randn(4, *CAT_INPUT[1:])
    nets = sources(CatNet, x)
    new, _ = grow(nets, x, new_coefficients="zero")
    torch.testing.assert_close(new(x), nets[0](x) + nets[1](x), rtol=1e-5, atol=1e-5)
    c = mix_producers(new)["fxgrow.c.weight_mix"]
    assert c.perm_in is not None and c.perm_out is None  # cat: [a 6 | b 10], not band-major
    # flatten repeats each channel 16x in a row: band-major again, no permutation
    assert mix_producers(new)["fxgrow.fc.weight_mix"].perm_in is None


@pytest.mark.parametrize("build,shape,factor,n", [
    (ConvBN, (1, 8, 8), 2, 1), (ConvBN, (1, 8, 8), 3, 1), (ConvBN, (1, 8, 8), 3, 3), (ResNetTiny, (3, 8, 8), 3, 2)])
def test_sources_fill_the_first_diagonal_blocks(build, shape, factor, n):
    """With zeroed new blocks the grown net is the sum of its source nets, for any g >= n."""
    x = torch.randn(4, *shape)
    nets = sources(build, x, n)
    new, info = grow(nets, x, factor, new_coefficients="zero")
    torch.testing.assert_close(new(x), sum(net(x) for net in nets), rtol=1e-5, atol=1e-5)
    assert info["sources"] == n and info["factor"] == factor


# --- widths and per-channel tensors ---------------------------------------------------------

@pytest.mark.parametrize("factor", [2, 3])
def test_widths_are_exactly_g_times(factor):
    x = torch.randn(2, 3, 8, 8)
    net = source(ResNetTiny(), x, 0)
    new, info = grow([net], x, factor)
    old_shapes = {p.source: p.weight_shape for p in mix_producers(net).values()}
    new_shapes = {p.source: p.weight_shape for p in mix_producers(new).values()}
    for key, (co, ci, *k) in old_shapes.items():
        g_out = 1 if key == "fc.weight" else factor
        g_in = 1 if key == "conv1.weight" else factor
        assert new_shapes[key] == (g_out * co, g_in * ci, *k), key
    for name, t in net.state_dict().items():
        if ".bn" in name or "shortcut.1" in name:
            grown = new.state_dict()[name]
            assert grown.shape == ((factor * t.shape[0],) if t.dim() else ()), name
    assert new.fc.bias.shape == net.fc.bias.shape
    assert [w["after"] for w in info["widths"]] == [factor * w["before"] for w in info["widths"]]
    y = new(x)
    assert y.shape == (2, 10)


def test_norm_statistics_are_concatenated():
    x = torch.randn(2, 1, 8, 8)
    nets = sources(ConvBN, x)
    new, _ = grow(nets, x)
    for name in ("bn1", "bn2"):
        for t in ("weight", "bias", "running_mean", "running_var"):
            key = f"{name}.{t}"
            assert torch.equal(new.state_dict()[key], torch.cat([n.state_dict()[key] for n in nets])), key
    assert torch.equal(new.conv2.bias, torch.cat([nets[0].conv2.bias, nets[1].conv2.bias]))
    assert torch.equal(new.fc.bias, nets[0].fc.bias + nets[1].fc.bias)


def test_without_fusion_new_channels_start_at_defaults():
    x = torch.randn(2, 1, 8, 8)
    net = source(ConvBN(), x, 0)
    new, _ = grow([net], x)
    c = net.bn1.weight.shape[0]
    for key, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        grown = getattr(new.bn1, key)
        assert torch.equal(grown[:c], getattr(net.bn1, key)) and torch.all(grown[c:] == value), key
    assert torch.all(new.conv2.bias[net.conv2.bias.shape[0]:] == 0)
    assert torch.equal(new.fc.bias, net.fc.bias)


def test_depthwise_convs_grow_their_groups():
    entry = next(e for e in SMALL_ZOO if e.name == "depthwise")
    x = entry.example()
    new, _ = grow([source(entry.build(), x, 0)], x)
    node = next(n for n in new.graph.nodes if n.meta.get("fxgrow", {}).get("source") == "dw"
                and n.meta["fxgrow"]["role"] == "layer")
    assert node.args[6] == 16 and new.dw.groups == 16 and new.dw.out_channels == 16
    assert mix_producers(new)["fxgrow.dw.weight_mix"].weight_shape == (16, 1, 3, 3)


# --- layouts and coefficients ---------------------------------------------------------------

@pytest.mark.parametrize("layout,square", [("vertical", [[0, 0], [1, 1]]), ("horizontal", [[0, 1], [0, 1]])])
def test_layouts_pick_the_template_sets(layout, square):
    x = torch.randn(2, 1, 8, 8)
    nets = sources(MLP, x)
    new, _ = grow(nets, x, layout=layout)
    sets = {row["weight"]: row["block_sets"] for row in TemplateMixingPass().describe(new)}
    assert sets == {"fc1.weight": [[0], [1]], "fc2.weight": square, "head.weight": [[0, 1]]}
    # numerically: with set 1's templates zeroed, exactly the blocks that mix set 1 vanish
    bank = new.get_submodule(mix_producers(new)["fxgrow.fc2.weight_mix"].bank)
    templates = bank.templates.detach().clone()
    templates[bank.per_set:] = 0
    w = mix_producers(new)["fxgrow.fc2.weight_mix"](templates).detach()
    for r in range(2):
        for c in range(2):
            block = w[32 * r:32 * (r + 1), 32 * c:32 * (c + 1)]
            assert (block.abs().sum() == 0) == (square[r][c] == 1), (r, c)


def test_orthogonal_new_coefficients_are_orthogonal_to_their_sets_users():
    x = torch.randn(2, 1, 8, 8)
    nets = sources(MLP, x, templates=4, share="none")
    new, _ = grow(nets, x)
    p = mix_producers(new)["fxgrow.fc2.weight_mix"]  # 2x2 grid, vertical: row r mixes set r
    a = p.alpha.detach().double()
    for r in range(2):
        row = torch.stack([a[r, 0], a[r, 1]])
        source_block, new_block = a[r, r], a[r, 1 - r]
        assert abs(new_block.norm().item() - 1) < 1e-6
        assert abs((source_block @ new_block).item()) < 1e-6, row
    for r in range(2):  # first layer: rows are sources
        assert torch.equal(mix_producers(new)["fxgrow.fc1.weight_mix"].alpha[r, 0],
                           mix_producers(nets[r])["fxgrow.fc1.weight_mix"].alpha[0, 0])


def test_orthogonal_falls_back_to_unit_vectors_when_the_span_is_full():
    x = torch.randn(2, 1, 8, 8)
    new, _ = grow(sources(MLP, x, templates=1, share="none"), x)
    a = mix_producers(new)["fxgrow.fc2.weight_mix"].alpha.detach()
    assert torch.allclose(a[0, 1].abs(), torch.ones(1)) and torch.allclose(a[1, 0].abs(), torch.ones(1))


def test_copy_and_random_coefficients():
    x = torch.randn(2, 1, 8, 8)
    nets = sources(MLP, x)
    copied = mix_producers(grow(nets, x, new_coefficients="copy")[0])["fxgrow.fc2.weight_mix"].alpha
    assert torch.equal(copied[0, 1], copied[0, 0]) and torch.equal(copied[1, 0], copied[1, 1])
    noisy = mix_producers(grow(nets, x, new_coefficients="copy", noise=0.1)[0])["fxgrow.fc2.weight_mix"].alpha
    assert not torch.equal(noisy[0, 1], noisy[0, 0]) and torch.allclose(noisy[0, 1], noisy[0, 0], atol=0.5)
    random = mix_producers(grow(nets, x, new_coefficients="random")[0])["fxgrow.fc2.weight_mix"].alpha
    assert not torch.equal(random[0, 1], random[0, 0])


# --- other producers --------------------------------------------------------------------------

def companded(net, scale):
    for key, chain in weight_chains(net).items():
        if chain.param == "weight":
            insert_producer(net, chain, CompandProducer(scale), "compander")
    net.recompile()
    return net


def test_growth_carries_the_compander():
    x = torch.randn(4, 1, 8, 8)
    nets = [companded(n, CompanderScale(0.7, 0.8, learnable=False)) for n in sources(ConvBN, x)]
    new, _ = grow(nets, x, new_coefficients="zero")
    torch.testing.assert_close(new(x), nets[0](x) + nets[1](x), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, CompandProducer) for m in new.modules()) == 3


def test_fusing_different_learned_compander_scales_is_refused():
    x = torch.randn(2, 1, 8, 8)
    nets = [companded(n, CompanderScale(0.5 + 0.1 * i, 1.0, learnable=True))
            for i, n in enumerate(sources(ConvBN, x))]
    with pytest.raises(FxgrowError, match="compander .* differs between the source nets"):
        grow(nets, x)


class Mask(Producer):
    rank, role = 20, "mask"

    def forward(self, w):
        return w


def test_unsupported_producers_are_refused():
    x = torch.randn(2, 1, 8, 8)
    net = source(ConvBN(), x, 0)
    insert_producer(net, weight_chains(net)["conv2.weight"], Mask(), "prune_regrow")
    with pytest.raises(FxgrowError, match="'conv2.weight'.* mask producer"):
        grow([net], x)


# --- the pass and its callback -----------------------------------------------------------------

def test_pass_checks_the_model_and_hands_a_callback():
    x = torch.randn(2, 1, 8, 8)
    result = Pipeline([TemplateMixingPass(), GrowPass(at=AT)])(ConvBN(), x)
    assert [type(cb) for cb in result.callbacks][-1] is GrowCallback
    assert {m.layer for m in result.matches["passes.1"]} == {"conv1", "conv2", "fc"}
    with pytest.raises(PassError, match="template_mixing pass before it"):
        GrowPass(at=AT)(ConvBN(), x)


def test_layers_that_grow_must_be_mixed():
    x = torch.randn(2, 1, 8, 8)
    net = TemplateMixingPass(targets={"types": ["Conv2d"]})(ConvBN(), x).graph_module
    with pytest.raises(FxgrowError, match="'fc' is not"):
        grow_model(net, [net.state_dict()], 2, x)


def test_nothing_to_grow_is_an_error():
    x = torch.randn(2, 1, 8, 8)  # one linear from the input to the output: no hidden channels
    net = TemplateMixingPass()(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x).graph_module
    with pytest.raises(FxgrowError, match="no channel group can grow"):
        grow_model(net, [net.state_dict()], 2, x)


def test_surviving_parameters():
    x = torch.randn(2, 1, 8, 8)
    net = source(ConvBN(), x, 0)
    new, _ = grow([net], x)
    kept = surviving_params(net, new)
    assert {k for k in kept if k.endswith(".templates")} == {k for k, _ in net.named_parameters()
                                                             if k.endswith(".templates")}
    assert not any(k.endswith(".alpha") or k.startswith("bn") for k in kept)
    fused, _ = grow(sources(ConvBN, x), x)
    assert not any(k.endswith(".templates") for k in surviving_params(net, fused))


def test_fuse_checkpoint_must_match(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    net = source(ConvBN(), x, 0)
    other = source(ConvBN(c=4), x, 1)
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": other.state_dict()})
    with pytest.raises(FxgrowError, match=r"tensor 'bn1.weight' has shape \(4,\), this run's has \(8,\)"):
        load_source(tmp_path, net.state_dict())
    same = source(ConvBN(), x, 1)
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": same.state_dict()})
    assert load_source(tmp_path, net.state_dict()).keys() == net.state_dict().keys()
    with pytest.raises(FxgrowError, match="no checkpoint at .*nowhere"):
        load_source(tmp_path / "nowhere", net.state_dict())
    (tmp_path / "broken.pt").write_text("not a checkpoint")
    with pytest.raises(FxgrowError, match="cannot read .*broken.pt"):
        load_source(tmp_path / "broken.pt", net.state_dict())


def test_bad_specs_name_the_field():
    with pytest.raises(SpecError, match="factor"):
        GrowPass(at=AT, factor=1)
    with pytest.raises(SpecError, match="exactly one of"):
        GrowPass(at={"epoch": 1, "step": 3})
    with pytest.raises(SpecError, match="no targets"):
        GrowPass(at=AT, targets={"types": ["Conv2d"]})
    with pytest.raises(SpecError, match="more source nets"):
        GrowPass(at=AT, fuse=["a", "b"])
    with pytest.raises(SpecError, match="flops_fraction"):
        GrowPass(at={"flops_fraction": 1.5})
    with pytest.raises(SpecError, match=r"passes.1.at.epoch: growth at epoch 5 never happens"):
        parse_spec({"passes": [{"kind": "template_mixing"}, {"kind": "grow", "at": {"epoch": 5}}],
                    "train": {"epochs": 5}})
    assert GrowPass(at=AT, fuse="none").spec.fuse == []


class FakeContext:
    """The part of the loop a GrowCallback uses."""

    def __init__(self, model, x, total_steps=10, steps_per_epoch=5):
        self.model, self.batch = model, (x, None)
        self.step, self.epoch, self.seed, self.device = 0, 0, 0, x.device
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.records, self.replaced = [], []

    def replace_model(self, model, param_map=None):
        self.model = model
        self.replaced.append(param_map)

    def log(self, record):
        self.records.append(record)


def test_callback_grows_at_its_step_and_regrows_on_resume():
    x = torch.randn(4, 1, 8, 8)
    spec = GrowPass(at={"epoch": 1}).spec
    ctx = FakeContext(source(ConvBN(), x, 0), x)
    cb = GrowCallback(spec)
    cb.on_train_start(ctx)
    for step in range(5):
        ctx.step = step
        cb.on_step_start(ctx)
        assert not ctx.replaced
    ctx.step = 5
    cb.on_step_start(ctx)
    assert len(ctx.replaced) == 1 and cb.grown and ctx.records[-1]["split"] == "grow"
    grown_state = ctx.model.state_dict()
    # resume: a fresh small model, the callback's state, then the checkpoint's model state
    resumed = FakeContext(source(ConvBN(), x, 3), x)
    cb2 = GrowCallback(spec)
    resumed.model = cb2.replay_structure(resumed.model, cb.state_dict())
    cb2.on_train_start(resumed)
    cb2.load_state_dict(cb.state_dict(), resumed)
    resumed.model.load_state_dict(grown_state)
    torch.testing.assert_close(resumed.model.eval()(x), ctx.model.eval()(x), rtol=0, atol=0)
    assert [n for n, _ in resumed.model.named_parameters()] == [n for n, _ in ctx.model.named_parameters()]
    assert cb2.report()["grown"] and cb2.report()["step"] == 5


def test_callback_rejects_growth_past_the_end():
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(FxgrowError, match="never happens"):
        GrowCallback(GrowPass(at={"step": 10}).spec).on_train_start(FakeContext(source(ConvBN(), x, 0), x))
    cb = GrowCallback(GrowPass(at={"flops_fraction": 0.9}).spec)
    ctx = FakeContext(source(ConvBN(), x, 0), x)
    cb.on_train_start(ctx)
    with pytest.raises(FxgrowError, match="never reached"):
        cb.on_step_start(ctx)


def test_flops_fraction_picks_the_step():
    x = torch.randn(4, 1, 8, 8)
    cb = GrowCallback(GrowPass(at={"flops_fraction": 0.1}).spec)
    ctx = FakeContext(source(ConvBN(), x, 0), x, total_steps=100)
    cb.on_train_start(ctx)
    cb.on_step_start(ctx)
    from fxgrow.analysis import forward_flops
    small = forward_flops(ctx.model, x)
    big = forward_flops(grow([ctx.model], x)[0], x)
    assert cb.growth_step == math.ceil(0.1 * big * 100 / small) and 0 < cb.growth_step < 100


def test_growth_after_the_compander_pass():
    """template_mixing (preserve) + compander keep the function; growth carries both."""
    from fxgrow.passes.compander import CompanderPass
    x = torch.randn(4, 1, 8, 8)
    plain = [ConvBN().eval() for _ in range(2)]
    nets = [Pipeline([TemplateMixingPass(template_init="preserve"), CompanderPass()])(m, x, seed=i).graph_module.eval()
            for i, m in enumerate(plain)]
    for net, model in zip(nets, plain):
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-5)
    new, _ = grow(nets, x, new_coefficients="zero")
    torch.testing.assert_close(new(x), plain[0](x) + plain[1](x), rtol=1e-4, atol=1e-5)
