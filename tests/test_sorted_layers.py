"""Sorted slicing's depth by layers (transformers): depth k is exactly the model with the
first k entries of its layer list, then the final norm and head, for a pre-LN decoder traced
with FX, nn.TransformerEncoder post-LN and pre-LN, and exported Hugging Face GPT-2 / LLaMA /
BERT (against the same class built with k layers, loaded strictly with the first k layers'
weights); extract == sliced; which blocks the finder takes and why; Sorted LLaMA's every
depth each step (the step's gradient is the sum of the per-depth gradients); resume."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fxgrow.errors import SpecError
from fxgrow.frontends import capture
from fxgrow.passes import Pipeline
from fxgrow.passes.sorted_slicing import SortedSlicingPass, SortedSlicingSpec
from fxgrow.passes.sorted_slicing_layers import entry_of
from fxgrow.subnets import extract, find_state, kept_units, subnet

from .test_slicing import ResidualMLP
from .test_slicing_train import GradProbe, Recorder, assert_step_gradients, resumed_like_uninterrupted, train_spec
from .zoo import Encoder, ResNetTiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "models"))
import tiny_lm  # noqa: E402

VOCAB, TOKENS = 50, 8


def _truncate(model: nn.Module, path: str, k: int) -> nn.Module:
    """A copy of `model` whose layer list `path` keeps its first k entries."""
    small = copy.deepcopy(model)
    owner_path, _, name = path.rpartition(".")
    owner = small.get_submodule(owner_path) if owner_path else small
    if k == 0 and isinstance(owner, nn.TransformerEncoder) and owner.norm is None:  # it cannot run no layer
        small.set_submodule(owner_path, nn.Identity())
        return small
    setattr(owner, name, getattr(owner, name)[:k])
    if hasattr(owner, "num_layers"):
        owner.num_layers = k
    return small


def _no_dropout(config):
    for name, value in vars(config).items():
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
            setattr(config, name, 0.0)
    return config


def _hf(name: str):
    """(builder, the config field counting layers) of a tiny HF model (no dropout, so train
    mode is deterministic too)."""
    transformers = pytest.importorskip("transformers")
    from .test_export_frontend import bert, gpt2, llama
    build, field = {"gpt2": (gpt2, "n_layer"), "llama": (llama, "num_hidden_layers"),
                    "bert": (bert, "num_hidden_layers")}[name]
    base = build()
    config = _no_dropout(copy.deepcopy(base.config))
    config.use_cache = False
    auto = (transformers.AutoModelForSequenceClassification if name == "bert"
            else transformers.AutoModelForCausalLM)

    def make(layers: int | None = None):
        c = copy.deepcopy(config)
        if layers is not None:
            setattr(c, field, layers)
        return auto.from_config(c)
    return make, getattr(config, field)


def _hf_truncated(model: nn.Module, path: str, k: int, make) -> nn.Module:
    """The HF class built with k layers, loaded strictly with the first k layers' weights."""
    small = make(k)
    state = {key: v for key, v in model.state_dict().items()
             if not key.startswith(path + ".") or int(key[len(path) + 1:].split(".")[0]) < k}
    small.load_state_dict(state, strict=True)
    return small


def _out(y):
    return y.logits if hasattr(y, "logits") else y


# name -> () -> (model, example input, layer list path, truncate(model, k), frontend)
def _tiny_lm():
    model = tiny_lm.build(vocab_size=VOCAB, block_size=16, dim=16, heads=2, layers=3)
    x = torch.randint(0, VOCAB, (3, TOKENS), generator=torch.Generator().manual_seed(5))
    return model, x, "blocks", lambda m, k: _truncate(m, "blocks", k), "fx"


def _encoder(norm_first):
    def build():
        return (Encoder(norm_first), torch.randn(3, 1, 8, 8), "encoder.layers",
                lambda m, k: _truncate(m, "encoder.layers", k), "fx")
    return build


def _hf_case(name, path):
    def build():
        make, _ = _hf(name)
        x = torch.randint(0, 96, (3, TOKENS), generator=torch.Generator().manual_seed(5))
        return make(), x, path, lambda m, k: _hf_truncated(m, path, k, make), "export"
    return build


MODELS = {
    "tiny_lm": _tiny_lm,
    "encoder_post_ln": _encoder(False),
    "encoder_pre_ln": _encoder(True),
    "hf_gpt2": _hf_case("gpt2", "transformer.h"),
    "hf_llama": _hf_case("llama", "model.layers"),
    "hf_bert": _hf_case("bert", "bert.encoder.layer"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def depth_case(request):
    """(model, x, layer list, truncate, sliced GraphModule, record) once per model."""
    torch.manual_seed(0)
    model, x, path, truncate, frontend = MODELS[request.param]()
    model.eval()
    gm = capture(model, frontend, x)
    result = Pipeline([SortedSlicingPass(depth={"blocks": "all"})])(gm, example_input=x)
    return model, x, path, truncate, result.graph_module, result.records["passes.0"]


def _run(model, x, training):
    model.train(training)
    return _out(model(x))  # grad on: nn.TransformerEncoder's eval fast path is another kernel


def test_the_blocks_are_the_layers_of_the_list(depth_case):
    model, _, path, _, gm, record = depth_case
    n = len(model.get_submodule(path))
    assert record.depth_by == "layers" and record.blocks == [f"{path}.{i}" for i in range(n)]
    assert find_state(gm).points == tuple((1.0, k) for k in range(n + 1))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_depth_k_is_the_model_with_its_first_k_layers(depth_case, training):
    model, x, path, truncate, gm, _ = depth_case
    n = len(model.get_submodule(path))
    assert torch.equal(_run(gm, x, training), _run(model, x, training))  # full depth == the original
    for k in range(n + 1):
        reference = truncate(model, k)
        with subnet(gm, None, k):
            sliced = _run(gm, x, training)
        assert torch.equal(sliced, _run(reference, x, training)), k
        small = extract(gm, None, k)
        assert torch.equal(_run(small, x, training), sliced), k
        assert set(small.state_dict()) == set(reference.state_dict()), k  # no dropped layer's weights left
        assert all((entry_of(node, path) or 0) < max(k, 1) for node in small.graph.nodes), k  # nor their nodes
    gm.eval()


def test_dropped_layers_get_no_gradient(depth_case):
    model, x, path, _, gm, _ = depth_case
    gm.zero_grad(set_to_none=True)
    with subnet(gm, None, 1):
        _run(gm, x, True).float().sum().backward()
    grads = {name: p.grad for name, p in gm.named_parameters()}
    gm.eval()
    assert all(g is None for name, g in grads.items() if name.startswith(f"{path}.1."))
    assert any(g is not None for name, g in grads.items() if name.startswith(f"{path}.0."))
    gm.zero_grad(set_to_none=True)


def test_extract_hook_says_what_the_point_keeps(depth_case):
    model, _, path, _, gm, _ = depth_case
    assert kept_units(gm, None, 1) == {"layers": {path: 1}, "groups": {}, "dims": {}}


# --- which blocks -----------------------------------------------------------------------------

@pytest.mark.parametrize("build, shape, by, words", [
    (ResNetTiny, (3, 16, 16), "residual", "not by layers: 2 layer lists of 2 entries"),
    (ResidualMLP, (1, 8, 8), "residual", "not by layers: layer list 'blocks': blocks.1 reads add from outside the list"),
    (lambda: Encoder(False), (1, 8, 8), "layers", "layer list 'encoder.layers'; its 6 residual blocks are counted"),
], ids=["resnet", "residual_add_outside_the_list", "transformer"])
def test_the_finder_takes_layers_or_residual_blocks_and_says_why(build, shape, by, words):
    torch.manual_seed(0)
    record = Pipeline([SortedSlicingPass(depth={"blocks": "all"})])(build(), example_input=torch.randn(2, *shape)
                                                                      ).records["passes.0"]
    assert record.depth_by == by and words in record.depth_note


def test_by_residual_keeps_the_residual_blocks_of_a_transformer():
    torch.manual_seed(0)
    record = Pipeline([SortedSlicingPass(depth={"blocks": "all", "by": "residual"})])(
        Encoder(True), example_input=torch.randn(2, 1, 8, 8)).records["passes.0"]
    assert record.depth_by == "residual" and len(record.blocks) == 6


@pytest.mark.parametrize("depth, field, words", [
    ({"layers": "nope"}, "passes.0.depth.layers", "'nope' is not a module of the model"),
    ({"layers": "head"}, "passes.0.depth.layers", "'head' is a Linear, not a list"),
    ({"by": "layers"}, "passes.0.depth.by", "2 layer lists of 2 entries"),
])
def test_a_layer_list_that_is_not_one_is_an_error_naming_the_field(depth, field, words):
    model = ResNetTiny() if depth.get("by") else Encoder(False)
    with pytest.raises(SpecError) as e:
        Pipeline([SortedSlicingPass(depth={"blocks": "all", **depth})])(model, example_input=torch.randn(2, *(
            (3, 16, 16) if depth.get("by") else (1, 8, 8))))
    assert e.value.errors[0][0] == field and words in e.value.errors[0][1]


class SideRead(nn.Module):
    """Layer 1 also reads layer 0's hidden value: no longer one stream."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        a = self.layers[0](x)
        return self.layers[2](self.layers[1](a) + a)


class NormedLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("model, words", [
    (SideRead(), "layers.2 reads add from outside the list and nothing layers.1 hands on"),
    (NormedLayers(), "holds BatchNorm1d 'layers.0.1': a dropped layer still runs"),
])
def test_layers_that_are_not_one_stream_are_refused(model, words):
    with pytest.raises(SpecError, match=words):
        Pipeline([SortedSlicingPass(depth={"blocks": "all", "layers": "layers"})])(model, example_input=torch.randn(4, 8))


def test_depth_with_width_on_fx_keeps_both():
    torch.manual_seed(0)
    model, x, path, truncate, _ = _tiny_lm()
    gm = Pipeline([SortedSlicingPass(width={"fractions": [0.5, 1.0]}, depth={"blocks": [1, 3]})])(
        model.eval(), example_input=x).graph_module.eval()
    with subnet(gm, 0.5, 1):
        sliced = gm(x)
    small = extract(gm, 0.5, 1)
    assert torch.equal(small(x), sliced)
    assert set(k for k in small.state_dict() if k.startswith("blocks.")) == {
        k for k in truncate(model, 1).state_dict() if k.startswith("blocks.")}
    units = kept_units(gm, 0.5, 1)
    assert units["layers"] == {"blocks": 1} and units["groups"] and all(
        v == find_state(gm).sizes[g][0] for g, v in units["groups"].items())


# --- Sorted LLaMA: every depth each step ------------------------------------------------------

def test_every_depth_needs_stochastic_mode():
    with pytest.raises(ValueError, match="every_depth .* use mode: stochastic"):
        SortedSlicingSpec(depth={"blocks": "all", "every_depth": True}, mode="sandwich")


def test_every_depth_runs_all_depths_each_step_and_sums_their_gradients(tmp_path):
    from fxgrow.train import Trainer

    torch.manual_seed(0)
    result = Pipeline([SortedSlicingPass(depth={"blocks": "all", "every_depth": True},
                                         width={"fractions": [0.5, 1.0]})])(Encoder(False), example_input=torch.randn(2, 1, 8, 8))
    gm, callbacks = result.graph_module, result.callbacks
    assert callbacks[0].spec.reduction == "sum"  # Sorted LLaMA sums the sub-models' losses
    probe = GradProbe()
    Trainer(gm, train_spec(epochs=1, batch_size=16), [*callbacks, probe], out_dir=tmp_path).fit()
    widths = set()
    for step in probe.steps:
        (_, points), = step["batches"]
        width = points[0][0]
        widths.add(width)
        assert points == [(width, d) for d in (3, 2, 1, 0)]  # every depth at the drawn width, the deepest first
    assert widths == {0.5, 1.0}
    assert_step_gradients(gm, probe, lambda k, n: 1.0)  # the sum of the per-depth gradients


def test_layer_depth_and_ffn_sampling_resumes_bit_identically(tmp_path):
    from fxgrow.train import Trainer

    def run(out, extra=(), resume=None):
        torch.manual_seed(0)
        result = Pipeline([SortedSlicingPass(depth={"blocks": "all"}, ffn={"fractions": [0.5, 1.0]},
                                             sub_models_per_batch=2)])(Encoder(True), example_input=torch.randn(2, 1, 8, 8))
        recorder = Recorder()
        trainer = Trainer(result.graph_module, train_spec(epochs=3, checkpoint=True, checkpoint_every_steps=3),
                          [*result.callbacks, recorder, *extra], out_dir=out, resume=resume)
        trainer.fit()
        return recorder, trainer

    reference = resumed_like_uninterrupted(run, tmp_path)
    ran = [p for points in reference.runs.values() for p in points]
    assert {d for _, d in ran} == {0, 1, 2, 3} and {f for f, _ in ran} == {0.5, 1.0}


# --- several dimensions, sampled independently ---------------------------------------------

def _lm_dims(**fields):
    torch.manual_seed(0)
    model, x, _, _, _ = _tiny_lm()
    result = Pipeline([SortedSlicingPass(**fields)])(model.eval(), example_input=x)
    return model, x, result.graph_module.eval(), result


def test_width_and_a_per_dimension_field_are_refused_together():
    with pytest.raises(ValueError, match="width cuts every channel group by one fraction; ffn gives its own"):
        SortedSlicingSpec(width={"fractions": [0.5, 1.0]}, ffn={"fractions": [0.5, 1.0]})
    with pytest.raises(ValueError, match="include 1.0"):
        SortedSlicingSpec(heads={"fractions": [0.5]})


def test_groups_are_assigned_to_hidden_and_ffn_and_every_mixed_point_equals_its_extract():
    model, x, gm, result = _lm_dims(hidden={"fractions": [0.5, 1.0]}, ffn={"fractions": [0.25, 0.5, 1.0]},
                                    depth={"blocks": [1, 3]})
    state = find_state(gm)
    assert state.dims == ("hidden", "ffn")
    assert sorted(state.group_dims.values()) == ["ffn", "ffn", "ffn", "hidden"]  # 3 FFNs, one residual stream
    assert state.points == tuple((h, f, d) for h in (0.5, 1.0) for f in (0.25, 0.5, 1.0) for d in (1, 3))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # the largest sub-model is the model
        for point in state.points:
            state.activate(*point)
            sliced = gm(x)
            small = extract(gm, at=point)
            assert torch.equal(small(x), sliced), point
            assert small.get_submodule("blocks.0.fc1").out_features == {0.25: 16, 0.5: 32, 1.0: 64}[point[1]]
            assert small.get_submodule("tok").embedding_dim == {0.5: 8, 1.0: 16}[point[0]]
            assert len(small.get_submodule("blocks")._modules) == point[2]
        state.activate(*state.largest)
    rows = SortedSlicingPass(ffn={"fractions": [1.0]}).describe(gm)
    assert {r["dimension"] for r in rows} == {"hidden", "ffn", "depth", "depth blocks"}
    ffn_row = next(r for r in rows if r["dimension"] == "ffn")
    assert ffn_row["kept"] == "16 / 32 / 64 at 0.25 / 0.5 / 1"


def test_a_dimension_not_given_stays_at_full_size_and_says_so():
    _, x, gm, result = _lm_dims(ffn={"fractions": [0.5, 1.0]})
    record = result.records["passes.0"]
    assert set(find_state(gm).group_dims.values()) == {"ffn"}
    assert "a hidden group; hidden is not a dimension of this spec" in record.full_width.values()
    with subnet(gm, ffn=0.5):
        assert gm(x).shape == (3, TOKENS, VOCAB)
    assert kept_units(gm, ffn=0.5)["groups"] == {g: 32 for g in find_state(gm).group_dims}


def test_a_point_by_dimension_resolves_and_a_wrong_dimension_is_named():
    from fxgrow.errors import FxgrowError
    from fxgrow.subnets import resolve_point

    _, _, gm, _ = _lm_dims(hidden={"fractions": [0.5, 1.0]}, ffn={"fractions": [0.5, 1.0]}, depth={"blocks": [1, 3]})
    state = find_state(gm)
    assert resolve_point(state, ffn=0.5) == (1.0, 0.5, 3)
    assert resolve_point(state, hidden=0.5, depth=1) == (0.5, 1.0, 1)
    with pytest.raises(FxgrowError, match="no dimension 'width'; its dimensions: hidden, ffn, depth"):
        resolve_point(state, 0.5)
    with pytest.raises(FxgrowError, match=r"\(hidden any, ffn 0.3, depth any\) is not a grid point"):
        resolve_point(state, ffn=0.3)


def test_each_dimension_is_drawn_independently_and_summation_takes_every_point_below():
    from fxgrow.passes.sorted_slicing import SortedSlicingCallback

    points = [(h, f, d) for h in (0.5, 1.0) for f in (0.25, 0.5, 1.0) for d in (1, 2, 3)]
    draw = SortedSlicingCallback(SortedSlicingSpec(hidden={"fractions": [0.5, 1.0]}, ffn={"fractions": [0.25, 0.5, 1.0]},
                                                   depth={"blocks": [1, 2, 3]}))
    plans = [draw.plan(points, 7, step)[0][0] for step in range(600)]
    assert plans == [draw.plan(points, 7, step)[0][0] for step in range(600)]  # a function of (seed, step)
    for axis, values in enumerate([(0.5, 1.0), (0.25, 0.5, 1.0), (1, 2, 3)]):
        counts = [sum(p[axis] == v for p in plans) for v in values]
        assert min(counts) > 600 / len(values) * 0.7, (axis, counts)  # every value of every dimension, evenly
    # independent: the joint frequency of two coordinates is the product of their marginals
    both = sum(p[0] == 0.5 and p[1] == 0.25 for p in plans) / 600
    assert abs(both - (1 / 2) * (1 / 3)) < 0.06
    summation = SortedSlicingCallback(SortedSlicingSpec(hidden={"fractions": [0.5, 1.0]},
                                                        ffn={"fractions": [0.25, 0.5, 1.0]}, mode="summation"))
    grid = [(h, f, 3) for h in (0.5, 1.0) for f in (0.25, 0.5, 1.0)]
    for step in range(20):
        ran = summation.plan(grid, 1, step)[0]
        assert set(ran) == {p for p in grid if p[0] <= ran[0][0] and p[1] <= ran[0][1]}


def test_the_cli_reads_a_point_by_dimension():
    from fxgrow.cli.subnets import parse_point
    from fxgrow.errors import FxgrowError

    assert parse_point("heads=0.5, ffn=0.25,depth=2") == {"heads": 0.5, "ffn": 0.25, "depth": 2}
    assert parse_point(None) == {}
    with pytest.raises(FxgrowError, match="'ffn' is not dimension=number"):
        parse_point("heads=0.5,ffn")


def test_inspect_says_which_blocks_depth_counts_and_why():
    torch.manual_seed(0)
    gm = Pipeline([SortedSlicingPass(depth={"blocks": "all"})])(Encoder(False), example_input=torch.randn(2, 1, 8, 8)
                                                                 ).graph_module
    rows = SortedSlicingPass(depth={"blocks": "all"}).describe(gm)
    assert [r["item"] for r in rows if r["dimension"] == "depth"] == [
        f"block encoder.layers.{i} (layer list)" for i in range(3)]
    found = next(r for r in rows if r["dimension"] == "depth blocks")
    assert found["kept"].startswith("by layers: layer list 'encoder.layers'; its 6 residual blocks")


def test_group_dimensions_follow_the_layers_and_the_head_flag():
    from types import SimpleNamespace

    from fxgrow.passes.sorted_slicing_layers import group_dimension

    def group(layers, heads=False):
        return SimpleNamespace(uses=[SimpleNamespace(layer=name) for name in layers], producers=[], heads=heads)
    assert group_dimension(group(["model.layers.0.q", "model.layers.0.o"], heads=True), "model.layers") == "heads"
    assert group_dimension(group(["model.layers.1.up", "model.layers.1.down"]), "model.layers") == "ffn"
    assert group_dimension(group(["model.layers.0.o", "model.layers.1.q"]), "model.layers") == "hidden"
    assert group_dimension(group(["model.embed", "model.layers.0.q"]), "model.layers") == "hidden"


@pytest.mark.parametrize("name", ["tiny_lm", "hf_llama"])
def test_depth_stacked_on_the_compander_extracts_the_first_layers(name):
    """Producers of other passes end the dropped layers' weight chains: extract drops them too."""
    torch.manual_seed(0)
    model, x, path, truncate, frontend = MODELS[name]()
    from fxgrow.passes.compander import CompanderPass

    compander = CompanderPass(targets={"exclude": ["tok", "pos"]} if frontend == "fx" else {})  # embeddings: wide
    gm = Pipeline([compander, SortedSlicingPass(depth={"blocks": "all"})])(
        capture(model.eval(), frontend, x), example_input=x).graph_module
    with subnet(gm, None, 1), torch.no_grad():
        sliced = _out(gm.eval()(x))
    small = extract(gm, None, 1)
    assert torch.equal(_out(small(x)), sliced)
    assert set(small.state_dict()) == set(truncate(model, 1).state_dict())
    assert not [p for p, m in small.named_modules() if p.startswith("fxgrow")]



@pytest.fixture(scope="module")
def ffn_run(tmp_path_factory) -> Path:
    """A short digits run of a post-LN encoder with ffn x depth (layers) sub-models."""
    from fxgrow import api
    from fxgrow.specs.root import parse_spec

    out = tmp_path_factory.mktemp("ffn_run")
    root = Path(__file__).resolve().parents[1]
    api.run(parse_spec({
        "name": "ffn_cli",
        "model": {"entry": str(root / "tests/zoo.py:Encoder"), "example_input": [2, 1, 8, 8]},
        "passes": [{"kind": "sorted_slicing", "ffn": {"fractions": [0.5, 1.0]}, "depth": {"blocks": [1, 3]}}],
        "train": {"data": "digits", "steps": 4, "batch_size": 64, "progress": "none"},
    }), out_dir=out)
    return out


def test_cli_eval_and_extract_by_dimension(ffn_run):
    import json

    from typer.testing import CliRunner

    from fxgrow import api
    from fxgrow.cli.main import app

    result = CliRunner().invoke(app, ["eval", str(ffn_run), "--grid"])
    assert result.exit_code == 0, result.output
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines() if line.startswith("│")]
    assert [c[:2] for c in cells] == [["0.5", "1"], ["0.5", "3"], ["1", "1"], ["1", "3"]]
    report = json.loads((ffn_run / "report.json").read_text())["sorted_slicing"]
    assert [(r["ffn"], r["depth"]) for r in report["grid"]] == [(0.5, 1), (0.5, 3), (1.0, 1), (1.0, 3)]
    assert report["depth_by"] == "layers"
    result = CliRunner().invoke(app, ["extract", str(ffn_run), "--at", "ffn=0.5,depth=1"])
    assert result.exit_code == 0, result.output
    small = torch.load(ffn_run / "subnet_ffn0.5_d1.pt", weights_only=False)
    assert set(small.state_dict()) == set(_truncate(Encoder(False), "encoder.layers", 1).state_dict())
    _, gm = api.restore(ffn_run)
    x = torch.randn(5, 1, 8, 8)
    with subnet(gm, ffn=0.5, depth=1):
        assert torch.equal(small(x), gm(x))
    result = CliRunner().invoke(app, ["extract", str(ffn_run), "--width", "0.5"])
    assert result.exit_code == 1 and "no dimension 'width'; its dimensions: ffn, depth" in " ".join(result.output.split())
