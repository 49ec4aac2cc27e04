"""Channel coupling: the exact groups of hand-built nets, consistent groups on the model zoo,
and identical groups from plain and functionalized graphs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxgrow.analysis.coupling import ChannelUse as U
from fxgrow.analysis.coupling import channel_groups, coupling_graph
from fxgrow.analysis.shapes import propagate_shapes
from fxgrow.ir import functionalize, insert_producer, layer_types, weight_chains
from fxgrow.nn.base import Producer
from tests.zoo import ZOO, ZOO_IDS, Block


class Twice(Producer):
    def forward(self, w):
        return w * 2.0


_NORM_FUNCTIONS = {  # module type -> (function, operands, constant args after them)
    nn.BatchNorm2d: (F.batch_norm, ("running_mean", "running_var", "weight", "bias"),
                     lambda m: (False, m.momentum, m.eps)),
    nn.LayerNorm: (F.layer_norm, ("weight", "bias"), lambda m: (m.eps,)),
    nn.GroupNorm: (F.group_norm, ("weight", "bias"), lambda m: (m.eps,)),
}


def functionalize_norms(gm: fx.GraphModule) -> None:
    """Test-only: norm layers in the functional form the IR will give them (get_attr operands,
    the same meta tags as conv/linear)."""
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if type(module) not in _NORM_FUNCTIONS:
            continue
        fn, names, extra = _NORM_FUNCTIONS[type(module)]
        with gm.graph.inserting_before(node):
            operands = [gm.graph.get_attr(f"{node.target}.{n}") if getattr(module, n) is not None else None
                        for n in names]
            if fn is F.batch_norm:
                args = (node.args[0], *operands, *extra(module))
            else:
                shape = module.normalized_shape if fn is F.layer_norm else module.num_groups
                args = (node.args[0], shape, *operands, *extra(module))
            call = gm.graph.call_function(fn, args)
        call.meta.update(node.meta)
        call.meta["fxgrow"] = {"role": "layer", "source": node.target, "module_type": type(module).__name__}
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.recompile()


def make_functional(gm: fx.GraphModule) -> None:
    """Every conv/linear/norm in the IR's call_function form, a producer in every weight chain
    (shapes already propagated stay on the layer nodes)."""
    functionalize(gm, list(layer_types(gm)))
    for chain in weight_chains(gm).values():
        insert_producer(gm, chain, Twice(), "test")
    functionalize_norms(gm)
    gm.graph.lint()


@torch.no_grad()
def traced(model: nn.Module, example: torch.Tensor, functional: bool = False) -> fx.GraphModule:
    model = model.eval()
    gm = fx.symbolic_trace(model)
    if functional:
        make_functional(gm)
    ShapeProp(gm).propagate(example)
    return gm


def summary(model: nn.Module, example: torch.Tensor, functional: bool = False) -> list[tuple]:
    groups = channel_groups(traced(model, example, functional))
    assert [g.id for g in groups] == list(range(len(groups)))
    assert all(g.fixed == bool(g.reason) for g in groups)
    return [(g.size, g.uses, g.producers, g.reason) for g in groups]


def bn(path: str, offset: int = 0) -> list[U]:
    return [U(path, p, 0, offset) for p in ("weight", "bias", "running_mean", "running_var")]


# --- exact groups on hand-built nets ----------------------------------------------------

class TwoBlockResNet(nn.Module):
    """conv-bn-relu, a residual block, a downsampling block with a projection, pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.block1 = Block(4, 4)
        self.block2 = Block(4, 8, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(x))), 1))


RESNET_GROUPS = [
    (3, [U("conv", "weight", 1)], [], "model input"),
    # the stem and block1's output share channels through the residual add
    (4, [U("conv", "weight", 0), *bn("bn"), U("block1.conv1", "weight", 1), U("block1.conv2", "weight", 0),
         *bn("block1.bn2"), U("block2.conv1", "weight", 1), U("block2.shortcut.0", "weight", 1)],
     ["conv", "block1.conv2"], ""),
    (4, [U("block1.conv1", "weight", 0), *bn("block1.bn1"), U("block1.conv2", "weight", 1)], ["block1.conv1"], ""),
    (8, [U("block2.conv1", "weight", 0), *bn("block2.bn1"), U("block2.conv2", "weight", 1)], ["block2.conv1"], ""),
    # the projection shortcut and block2's main path are added: one group
    (8, [U("block2.conv2", "weight", 0), *bn("block2.bn2"), U("block2.shortcut.0", "weight", 0),
         *bn("block2.shortcut.1"), U("fc", "weight", 1)], ["block2.conv2", "block2.shortcut.0"], ""),
    (10, [U("fc", "weight", 0), U("fc", "bias", 0)], ["fc"], "model output"),
]


@pytest.mark.parametrize("functional", [False, True], ids=["plain", "functional"])
def test_residual_net_groups(functional):
    assert summary(TwoBlockResNet(), torch.randn(2, 3, 8, 8), functional) == RESNET_GROUPS


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.bn1 = nn.BatchNorm2d(6)
        self.pw = nn.Conv2d(6, 12, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3, bias=False)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = F.relu6(self.bn1(self.dw(x)))
        x = self.grouped(torch.relu(self.bn2(self.pw(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True], ids=["plain", "functional"])
def test_depthwise_couples_its_input_and_output_and_a_grouped_conv_moves_whole_groups(functional):
    assert summary(DepthwiseSeparable(), torch.randn(2, 3, 8, 8), functional) == [
        (3, [U("stem", "weight", 1)], [], "model input"),
        # depthwise: its weight dim 0 and bias follow the stem's channels; not a producer
        (6, [U("stem", "weight", 0), *bn("bn0"), U("dw", "weight", 0), U("dw", "bias", 0), *bn("bn1"),
             U("pw", "weight", 1)], ["stem"], ""),
        # groups=3: input group g feeds output group g only, so pw's outputs and the grouped
        # conv's outputs are one group of 3 units of 4 channels each (its weight dim 1, the
        # channels within a group, is no use)
        (3, [U("pw", "weight", 0, 0, 4), *[U("bn2", p, 0, 0, 4) for p in ("weight", "bias", "running_mean",
                                                                          "running_var")],
             U("grouped", "weight", 0, 0, 4), U("head", "weight", 1, 0, 4)], ["pw", "grouped"], ""),
        (5, [U("head", "weight", 0), U("head", "bias", 0)], ["head"], "model output"),
    ]


class ConcatNet(nn.Module):
    """Two branches concatenated, a norm and a depthwise conv over the concatenation, and a
    DenseNet-style concatenation with the input."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10, bias=False)
        self.mix = nn.Conv2d(13, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.dw(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))
        z = self.mix(torch.cat([x, y], 1))
        return self.fc(z.mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True], ids=["plain", "functional"])
def test_concat_places_groups_side_by_side(functional):
    assert summary(ConcatNet(), torch.randn(2, 3, 6, 6), functional) == [
        (3, [U("a", "weight", 1), U("b", "weight", 1), U("mix", "weight", 1, 0)], [], "model input"),
        (4, [U("a", "weight", 0), U("a", "bias", 0), *bn("bn", 0), U("dw", "weight", 0, 0),
             U("mix", "weight", 1, 3)], ["a"], ""),
        (6, [U("b", "weight", 0), U("b", "bias", 0), *bn("bn", 4), U("dw", "weight", 0, 4),
             U("mix", "weight", 1, 7)], ["b"], ""),
        (8, [U("mix", "weight", 0), U("mix", "bias", 0), U("fc", "weight", 1)], ["mix"], ""),
        (2, [U("fc", "weight", 0), U("fc", "bias", 0)], ["fc"], "model output"),
    ]


class FlattenHead(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(1, 3, 3, padding=1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(5 * 4 * 4, 7)

    def forward(self, x):
        y = torch.cat([self.c1(x), self.c2(x)], 1)
        if self.how == "view":
            y = y.view(y.size(0), -1)
        elif self.how == "module":
            y = self.flatten(y)
        else:
            y = torch.flatten(y, 1)
        return self.fc(y)


@pytest.mark.parametrize("how", ["view", "module", "function"])
@pytest.mark.parametrize("functional", [False, True], ids=["plain", "functional"])
def test_flatten_into_linear_repeats_each_channel_over_the_spatial_positions(how, functional):
    groups = summary(FlattenHead(how), torch.randn(2, 1, 4, 4), functional)
    assert groups[1:3] == [
        (2, [U("c1", "weight", 0), U("c1", "bias", 0), U("fc", "weight", 1, 0, 16)], ["c1"], ""),
        (3, [U("c2", "weight", 0), U("c2", "bias", 0), U("fc", "weight", 1, 32, 16)], ["c2"], ""),
    ]


class Unflatten(nn.Module):
    """A flatten undone by a view: the channels are conv channels again."""

    def __init__(self, literal: bool = False):
        super().__init__()
        self.literal = literal
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        y = self.c1(x).flatten(1)
        return self.c2(y.view(-1, 2, 4, 4) if self.literal else y.view(y.size(0), -1, 4, 4))


def test_view_that_undoes_a_flatten_keeps_the_group():
    assert summary(Unflatten(), torch.randn(2, 1, 4, 4))[1] == (
        2, [U("c1", "weight", 0), U("c1", "bias", 0), U("c2", "weight", 1)], ["c1"], "")


def test_a_view_that_hard_codes_the_channel_count_fixes_the_group():
    """view(-1, 2, 4, 4) with c1 cut to one channel would fold the batch into itself."""
    assert summary(Unflatten(literal=True), torch.randn(2, 1, 4, 4))[1] == (
        2, [U("c1", "weight", 0), U("c1", "bias", 0), U("c2", "weight", 1)], ["c1"], "view hard-codes a size of 2")


class TokensFlattened(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(5 * 6, 3)

    def forward(self, x):  # (N, 5 tokens, 4)
        return self.fc2(self.fc1(x).flatten(1))


def test_channels_flattened_into_an_inner_position_are_fixed():
    """(N, L, F) -> (N, L*F): feature f of token l sits at l*F + f, a stride no ChannelUse
    describes, so fc1's outputs must not be resized."""
    groups = summary(TokensFlattened(), torch.randn(2, 5, 4))
    assert (6, [U("fc1", "weight", 0), U("fc1", "bias", 0)], ["fc1"],
            "flattened into an inner position by flatten") in groups


MLP = lambda: nn.Sequential(  # noqa: E731
    nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))


@pytest.mark.parametrize("shape", [(4, 10), (4, 7, 10)], ids=["2d", "tokens"])
@pytest.mark.parametrize("functional", [False, True], ids=["plain", "functional"])
def test_mlp_groups_follow_the_last_dim(shape, functional):
    assert summary(MLP(), torch.randn(shape), functional) == [
        (10, [U("0", "weight", 1)], [], "model input"),
        (32, [U("0", "weight", 0), U("0", "bias", 0), U("3", "weight", 1)], ["0"], ""),
        (16, [U("3", "weight", 0), U("3", "bias", 0), U("4", "weight", 0), U("4", "bias", 0), U("6", "weight", 1)],
         ["3"], ""),
        (5, [U("6", "weight", 0), U("6", "bias", 0)], ["6"], "model output"),
    ]


class Attention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.d, self.heads = d, heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        n, length = x.size(0), x.size(1)
        q, k, v = (p(x).view(n, length, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d // self.heads), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(n, length, self.d))


class PlainTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.ln1 = nn.LayerNorm(8)
        self.attn = Attention()
        self.ln2 = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(self.ln1(h))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


@pytest.mark.parametrize("functional", [False, True], ids=["plain", "functional"])
def test_attention_residual_stream_is_exact_and_literal_heads_are_fixed(functional):
    groups = summary(PlainTransformer(), torch.randn(2, 5, 6), functional)
    free = [g for g in groups if not g[3]]
    ln = lambda p: [U(p, "weight", 0), U(p, "bias", 0)]  # noqa: E731
    assert free == [
        (8, [U("embed", "weight", 0), U("embed", "bias", 0), *ln("ln1"), U("attn.q", "weight", 1),
             U("attn.k", "weight", 1), U("attn.v", "weight", 1), U("attn.out", "weight", 0),
             U("attn.out", "bias", 0), *ln("ln2"), U("fc1", "weight", 1), U("fc2", "weight", 0),
             U("fc2", "bias", 0), U("head", "weight", 1)], ["embed", "attn.out", "fc2"], ""),
        (16, [U("fc1", "weight", 0), U("fc1", "bias", 0), U("fc2", "weight", 1)], ["fc1"], ""),
    ]
    # q, k, v are split into heads by a view: one group of 2 heads of 4 channels, which
    # attn.out reads; the view hard-codes the head count, so without size following
    # (sorted slicing's) it stays fixed
    fixed = {(u.layer, u.dim): (g[0], u.repeat, g[3]) for g in groups if g[3] for u in g[1]}
    for p in ("attn.q", "attn.k", "attn.v"):
        assert fixed[(p, 0)][:2] == (2, 4)
        assert "hard-codes a size of 2" in fixed[(p, 0)][2]
    assert fixed[("attn.out", 1)][:2] == (2, 4)  # 2 heads, each spanning 4 input features


def test_transformer_encoder_layer_is_followed_conservatively():
    entry = next(e for e in ZOO if e.name == "transformer")
    groups = channel_groups(traced(entry.build(), entry.example()))
    assert all(g.fixed for g in groups)
    embed = next(g for g in groups if "embed" in g.producers)
    assert "unknown op TransformerEncoderLayer (encoder)" in embed.reason


class ChannelsLast(nn.Module):
    """ConvNeXt style: a LayerNorm over channels moved last by permute, and back."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.ln = nn.LayerNorm(4)
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(self.ln(self.c1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class Stacked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.stack([self.a(x), self.b(x)], dim=1).sum(1))


@pytest.mark.parametrize("model, expected", [
    (ChannelsLast, (4, [U("c1", "weight", 0), U("c1", "bias", 0), U("ln", "weight", 0), U("ln", "bias", 0),
                        U("c2", "weight", 1)], ["c1"], "")),
    (Stacked, (4, [U("a", "weight", 0), U("a", "bias", 0), U("b", "weight", 0), U("b", "bias", 0),
                   U("head", "weight", 1)], ["a", "b"], "")),
], ids=["permute", "stack"])
def test_permute_and_stack_keep_channels_aligned(model, expected):
    assert summary(model(), torch.randn(2, 3, 5, 5))[1] == expected


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x) * self.gamma)


def test_a_parameter_used_directly_moves_with_the_channels_it_scales():
    groups = summary(LayerScale(), torch.randn(2, 3, 5, 5))
    assert (4, [U("conv", "weight", 0), U("conv", "bias", 0), U("", "gamma", 0), U("head", "weight", 1)],
            ["conv"], "") in groups
    # gamma's broadcast dims are not channels of anything
    assert (1, [U("", "gamma", 1)], [], "no producing layer") in groups


class UserFunctional(nn.Module):
    """Layers written with torch.nn.functional and the model's own parameters."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(6, 4))
        self.scale = nn.Parameter(torch.ones(6))
        self.shift = nn.Parameter(torch.zeros(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.layer_norm(F.linear(x, self.proj), (6,), self.scale, self.shift)
        return self.head(h)


def test_functional_layers_with_plain_parameters_are_layers_too():
    assert summary(UserFunctional(), torch.randn(2, 4))[1] == (
        6, [U("", "proj", 0), U("", "scale", 0), U("", "shift", 0), U("head", "weight", 1)], [""], "")


class Chunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = torch.chunk(self.conv(x), 2, dim=1)
        return self.head(a * b)


def test_an_op_the_analysis_cannot_follow_fixes_what_it_touches():
    groups = summary(Chunked(), torch.randn(2, 3, 4, 4))
    assert groups[1] == (8, [U("conv", "weight", 0), U("conv", "bias", 0)], ["conv"], "unknown op chunk")
    assert groups[2] == (4, [U("head", "weight", 1)], [], "unknown op chunk")


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(self.stem(x)))).mean((2, 3))


def test_a_module_called_twice_joins_its_input_and_output_channels():
    assert summary(SharedConv(), torch.randn(2, 3, 4, 4))[1] == (
        4, [U("stem", "weight", 0), U("stem", "bias", 0), U("shared", "weight", 1), U("shared", "weight", 0),
            U("shared", "bias", 0)], ["stem", "shared"], "model output")


def test_shapes_from_fake_tensors_give_the_same_groups():
    model, x = TwoBlockResNet().eval(), torch.randn(2, 3, 8, 8)
    gm = propagate_shapes(fx.symbolic_trace(model), x)
    assert channel_groups(gm) == channel_groups(traced(model, x))


def test_needs_shapes():
    with pytest.raises(ValueError, match="ShapeProp"):
        channel_groups(fx.symbolic_trace(MLP()))


def test_graph_components_are_the_groups():
    gm = traced(TwoBlockResNet(), torch.randn(2, 3, 8, 8))
    graph, groups = coupling_graph(gm), channel_groups(gm)
    params = [k for k, data in graph.nodes(data=True) if data["kind"] == "param"]
    assert sorted(graph.nodes[k]["use"] for k in params) == sorted(u for g in groups for u in g.uses)
    # the residual add in block1 ties the stem's output to block1's output
    assert ("tensor", "add", 1) in graph and graph.has_edge(("tensor", "add", 1), ("tensor", "block1_bn2", 1))


# --- the model zoo --------------------------------------------------------------------

FREE_GROUPS = {  # groups that growth, pruning and slicing may resize
    "mlp": 2, "conv_bn": 2, "depthwise": 2, "shared_linear": 1, "transformer": 0,
    "resnet_tiny": 6,  # stage 1 + stage 2 residual streams, one inner group per block
    "resnet18": 12,  # 4 residual streams + 8 blocks' inner groups
    "mobilenet_v2": 25,  # stem, 16 expansions (each with its depthwise), 7 stage outputs, last conv
}


def _param(gm: fx.GraphModule, use: U) -> torch.Tensor:
    return getattr(gm.get_submodule(use.layer), use.param)


@pytest.mark.parametrize("entry", ZOO, ids=ZOO_IDS)
def test_zoo_groups_are_consistent_and_both_forms_agree(entry):
    model, x = entry.build(), entry.example(batch=1)  # batch 1, as specs give it: a size-1 dim everywhere
    gm = traced(model, x)
    groups = channel_groups(gm)
    assert sum(not g.fixed for g in groups) == FREE_GROUPS[entry.name]
    # the uses of each parameter dim tile it exactly, block after block
    spans: dict[tuple, list[tuple[int, int]]] = {}
    for g in groups:
        for u in g.uses:
            spans.setdefault((u.layer, u.param, u.dim), []).append((u.offset, u.offset + g.size * u.repeat))
    for (layer, param, dim), found in spans.items():
        found.sort()
        ends = [0] + [end for _, end in found]
        assert [start for start, _ in found] + [_param(gm, U(layer, param, dim)).shape[dim]] == ends
    # every conv/linear the graph calls has its output channels in one group, as its producer
    for name in layer_types(gm):
        module = gm.get_submodule(name)
        assert spans[(name, "weight", 0)] == [(0, module.weight.shape[0])]
        depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
        assert sum(name in g.producers for g in groups) == (0 if depthwise else 1)
    make_functional(gm)
    assert channel_groups(gm) == groups


def test_use_indices_cover_each_channel_repeat_times_from_its_offset():
    use = U("fc", "weight", 1, offset=32, repeat=16)
    assert use.indices([0, 2]).tolist() == list(range(32, 48)) + list(range(64, 80))
    assert U("conv", "weight", 0).indices(torch.arange(3)).tolist() == [0, 1, 2]
