"""Channel coupling through norms other than BatchNorm, grouped convs and shape arguments:
which ops normalize over a group's channels, whole conv groups as units, sizes read from
tensors and sizes written as literals."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxgrow.analysis.coupling import ChannelUse as U
from fxgrow.analysis.coupling import channel_groups
from tests.test_coupling import summary, traced


class HandRMS(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class NormStream(nn.Module):
    """A residual stream read through a LayerNorm module, an nn.RMSNorm, a hand-written
    RMSNorm, a functional layer norm over the model's own parameters, and a softmax."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d)
        self.hand = HandRMS(d)
        self.w, self.b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.f = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f[0](self.ln(h))
        h = h + self.f[1](self.rms(h))
        h = h + self.f[2](self.hand(h))
        h = h + self.f[3](F.layer_norm(h, (8,), self.w, self.b))
        return self.head(h.softmax(-1))


def test_norms_over_a_group_are_its_normalizers_and_keep_it_free():
    (stream,) = [g for g in channel_groups(traced(NormStream(), torch.randn(2, 4, 5))) if g.size == 8 and not g.fixed
                 and "inp" in g.producers]
    assert U("rms", "weight", 0) in stream.uses and U("hand", "weight", 0) in stream.uses
    assert U("", "w", 0) in stream.uses and U("", "b", 0) in stream.uses
    assert [(n.kind, n.layer, n.dim) for n in stream.normalizers] == [
        ("layer_norm", "ln", 2), ("rms_norm", "rms", 2), ("reduce", "", 2), ("layer_norm", "", 2),
        ("reduce", "", 2)]  # the hand-written mean, the functional norm, the softmax
    assert stream.normalizers[2].op == "Tensor.mean (mean) in 'hand'" and "softmax" in stream.normalizers[4].op


def test_batch_norm_and_a_per_channel_group_norm_are_not_normalizers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.GroupNorm(4, 4),
                          nn.Conv2d(4, 2, 1))
    groups = channel_groups(traced(model, torch.randn(2, 3, 5, 5)))
    assert [g.normalizers for g in groups if not g.fixed] == [[], []]


class Grouped(nn.Module):
    """1x1 conv -> two grouped convs reading the same 12 channels (6 and 4 groups) -> heads."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.g6 = nn.Conv2d(12, 12, 3, padding=1, groups=6, bias=False)
        self.g4 = nn.Conv2d(12, 8, 3, padding=1, groups=4)
        self.c6 = nn.Conv2d(12, 2, 1)
        self.c4 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c6(self.g6(h)) + self.c4(self.g4(h))


def test_grouped_convs_move_their_inputs_and_outputs_in_whole_groups():
    """Units are the largest blocks every grouped conv divides: 12 input channels in 6 and in
    4 groups move 2 units of 6; each conv's output moves in as many units, of its own width."""
    groups = summary(Grouped(), torch.randn(2, 3, 6, 6))
    assert groups[1] == (2, [U("a", "weight", 0, 0, 6), U("a", "bias", 0, 0, 6), U("g6", "weight", 0, 0, 6),
                             U("c6", "weight", 1, 0, 6), U("g4", "weight", 0, 0, 4), U("g4", "bias", 0, 0, 4),
                             U("c4", "weight", 1, 0, 4)], ["a", "g6", "g4"], "")


def test_a_group_norm_with_groups_moves_whole_groups():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    assert summary(model, torch.randn(2, 3, 5, 5))[1] == (
        4, [U("0", "weight", 0, 0, 2), U("0", "bias", 0, 0, 2), U("1", "weight", 0, 0, 2), U("1", "bias", 0, 0, 2),
            U("3", "weight", 1, 0, 2)], ["0"], "")


def test_a_group_norm_with_one_group_normalizes_over_the_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8), nn.Conv2d(8, 2, 1))
    group = channel_groups(traced(model, torch.randn(2, 3, 5, 5)))[1]
    assert not group.fixed and [(n.kind, n.layer, n.dim) for n in group.normalizers] == [("group_norm", "1", 1)]


class Sizes(nn.Module):
    """A reshape whose sizes come from another tensor's shape, and one with a literal."""

    def __init__(self, literal: bool):
        super().__init__()
        self.literal = literal
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.head_a, self.head_b = nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x):  # (N, 4)
        u, v = self.a(x), self.b(x)
        v = v.reshape(-1, 6) if self.literal else v.reshape(u.shape[0], u.shape[1])
        return self.head_a(u) + self.head_b(v)


def test_a_size_read_from_a_tensor_couples_its_dim():
    """v.reshape(u.shape[0], u.shape[1]) ties v's channels to u's: cutting u alone would
    make the reshape fold the batch."""
    groups = summary(Sizes(literal=False), torch.randn(3, 4))
    assert (6, [U("a", "weight", 0), U("a", "bias", 0), U("b", "weight", 0), U("b", "bias", 0),
                U("head_a", "weight", 1), U("head_b", "weight", 1)], ["a", "b"], "") in groups


def test_a_literal_size_fixes_the_channels_it_counts():
    groups = summary(Sizes(literal=True), torch.randn(3, 4))
    assert (6, [U("a", "weight", 0), U("a", "bias", 0), U("head_a", "weight", 1)], ["a"], "") in groups
    assert (6, [U("b", "weight", 0), U("b", "bias", 0), U("head_b", "weight", 1)], ["b"],
            "reshape hard-codes a size of 6") in groups


@pytest.mark.parametrize("how", ["sum", "var", "matmul"])
def test_reductions_and_contractions_over_channels_are_normalizers(how):
    class Reduce(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 2)
            self.p = nn.Parameter(torch.ones(6, 6))

        def forward(self, x):
            h = self.a(x)
            if how == "sum":
                return self.head(h / h.sum(-1, keepdim=True))
            if how == "var":
                return self.head(h * torch.var(h, -1, keepdim=True))
            return self.head(h @ self.p)

    (group,) = [g for g in channel_groups(traced(Reduce(), torch.randn(3, 4))) if "a" in g.producers]
    assert [n.kind for n in group.normalizers] == ["contract" if how == "matmul" else "reduce"]
