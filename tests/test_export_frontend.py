"""The export front-end on Hugging Face models FX cannot trace (tiny configs built with
`from_config`, nothing downloaded): capture follows train() and eval(), the weight-chain
passes alone and stacked keep the function right after the rewrite, fold loads strictly into
the user's original class with ties kept, default targets cover every weight matrix, and
what neither front-end can take is refused naming the line."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from fxgrow import api
from fxgrow.errors import FxgrowError, TraceError
from fxgrow.fold import fold
from fxgrow.frontends import FrontendWarning, capture, frontend_of
from fxgrow.ir import layer_table, weight_chains
from fxgrow.nn.mask import MaskProducer
from fxgrow.specs.root import parse_spec
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")

VOCAB, TOKENS = 96, 8


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      attention_dropout=0.1, bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config)


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return transformers.AutoModelForSequenceClassification.from_config(config)


# model -> (builder, the original class's loader from a config)
ZOO = {"gpt2": (gpt2, transformers.AutoModelForCausalLM),
       "llama": (llama, transformers.AutoModelForCausalLM),
       "bert": (bert, transformers.AutoModelForSequenceClassification)}

COMPANDER = {"kind": "compander"}
PRUNE = {"kind": "prune_regrow", "final_sparsity": 0.5, "schedule": {"start": 0.0, "end": 0.5, "every": 5}}
STACKS = {"compander": [COMPANDER], "prune_regrow": [PRUNE], "compander+prune_regrow": [COMPANDER, PRUNE]}


def spec_for(passes, frontend="export", **model):
    return parse_spec({"model": {"frontend": frontend, "example_input": {"shape": [1, TOKENS], "dtype": "int64",
                                                                          "high": VOCAB}, **model},
                       "passes": passes, "train": {"steps": 10}})


def ids(batch=3, tokens=TOKENS, seed=5):
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def run(model, x, training, seed=1):
    model.train(training)
    torch.manual_seed(seed)
    with torch.no_grad():
        return logits(model(x))


@pytest.fixture(scope="module")
def captured():
    """{name: (original model, its export capture)}: one export per model for the module."""
    out = {}
    for name, (build, _) in ZOO.items():
        torch.manual_seed(0)
        model = build()
        out[name] = (model, api.trace_model(spec_for([]), model))
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_capture_follows_train_and_eval_and_keeps_the_state_dict(captured, name):
    model, gm = captured[name]
    assert frontend_of(gm) == "export" and type(gm).__mro__[1] is torch.fx.GraphModule  # (its per-instance class)
    assert list(gm.state_dict()) == list(model.state_dict()) or sorted(gm.state_dict()) == sorted(model.state_dict())
    x = ids(batch=1, tokens=5)  # another batch and length than the export's example
    assert torch.equal(run(gm, x, False), run(model, x, False))
    # train mode: the same dropout draws; a train-mode export reorders a kernel's layout (6e-8 measured)
    torch.testing.assert_close(run(gm, x, True), run(model, x, True), rtol=0, atol=1e-6)
    assert not torch.allclose(run(gm, x, True), run(gm, x, False))  # dropout is on in train()
    assert gm.meta["fxgrow.trace"]["mode_selects"] > 0


@pytest.mark.parametrize("name", list(ZOO))
def test_layers_cover_every_weight_matrix_and_ties_are_one_chain(captured, name):
    model, gm = captured[name]
    table = layer_table(gm)
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}  # one name per tensor
    assert {layer.weight for layer in table.values()} == matrices
    kinds = {layer.kind.name for layer in table.values()}
    assert kinds == ({"embedding", "transposed_linear", "linear"} if name == "gpt2" else {"embedding", "linear"})
    if name == "gpt2":  # the head reads the embedding's one chain
        assert table["lm_head"].weight == table["transformer.wte"].weight == "transformer.wte.weight"
        assert table["transformer.h.0.attn.c_attn"].names == ("transposed_linear", "Conv1D")


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("name", list(ZOO))
def test_passes_keep_the_function_and_fold_loads_into_the_original_class(captured, name, stack):
    model, gm = captured[name]
    result = api.compile_spec(spec_for(STACKS[stack]), gm)
    rewritten = result.graph_module
    x = ids()
    exact = stack == "prune_regrow"  # all-ones masks; the compander's atan round trip is rounding
    for training in (False, True):  # against the capture: like with like (same graph, same RNG draws)
        ours, theirs = run(rewritten, x, training), run(gm, x, training)
        if exact:
            assert torch.equal(ours, theirs)
        else:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    if "prune_regrow" in stack:
        masks = [m for m in rewritten.modules() if isinstance(m, MaskProducer)]
        assert masks and all(bool(m.mask.all()) for m in masks)
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    for entry in result.coverage().values():  # default targets: every weight matrix, nothing untouched
        assert entry["untouched"] == [] and entry["rewritten"] == entry["weights"] == len(matrices)
    folded = fold(rewritten).eval()
    state = folded.state_dict()
    _, auto = ZOO[name]
    fresh = auto.from_config(model.config).eval()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(logits(fresh(x)), run(rewritten, x, False))
    assert torch.equal(folded(x), run(rewritten, x, False))
    if name == "gpt2":
        assert folded.get_parameter("lm_head.weight") is folded.get_parameter("transformer.wte.weight")
        assert fresh.lm_head.weight is fresh.transformer.wte.weight
        chains = weight_chains(rewritten)
        assert "transformer.wte.weight" in chains and "lm_head.weight" not in dict(chains)


def test_untouched_weights_are_reported_with_the_reason(captured):
    _, gm = captured["gpt2"]
    result = api.compile_spec(spec_for([{"kind": "compander", "targets": {"types": ["Conv1D"]}}]), gm)
    untouched = {row["weight"]: row["reason"] for row in result.coverage()["passes.0"]["untouched"]}
    assert set(untouched) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all("not in targets.types" in reason for reason in untouched.values())


def test_template_mixing_runs_on_an_exported_graph(captured):
    model, gm = captured["llama"]
    result = api.compile_spec(spec_for([{"kind": "template_mixing", "templates": 2, "template_init": "preserve"}]), gm)
    x = ids()
    torch.testing.assert_close(run(result.graph_module, x, False), run(gm, x, False), rtol=0, atol=1e-5)
    fresh = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(fold(result.graph_module).state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh(x)), run(result.graph_module, x, False), rtol=0, atol=1e-6)


@pytest.mark.parametrize("passes, what", [
    ([dict(PRUNE, granularity="filter")], "granularity: filter"),
    ([{"kind": "template_mixing"}, {"kind": "grow", "factor": 2, "at": 5}], "grow")])
def test_channel_passes_are_refused_on_exported_graphs(captured, passes, what):
    _, gm = captured["llama"]
    with pytest.raises(FxgrowError, match=f"{what} does not run on a torch.export graph yet: export bakes"):
        api.compile_spec(spec_for(passes), gm)


def test_auto_falls_back_to_export_naming_why_fx_failed():
    torch.manual_seed(0)
    model = llama()
    with pytest.warns(FrontendWarning, match="torch.fx cannot trace LlamaForCausalLM .*co_varnames"):
        gm = api.trace_model(spec_for([], frontend="auto"), model)
    assert frontend_of(gm) == "export"
    with pytest.raises(TraceError, match=r"(?s)co_varnames.*fix: capture the model with torch.export instead: model: {frontend: export}"):
        api.trace_model(spec_for([], frontend="fx"), model)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # the line both front-ends stop at
            return y
        return -y


class StochasticDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if self.training:  # neither dropout nor batch norm: frozen in a train-mode export
            return x + self.fc(x) * (torch.rand(x.shape[0], 1) > 0.5)
        return x + self.fc(x)


def test_a_model_neither_front_end_takes_is_refused_naming_the_line():
    spec = parse_spec({"model": {"frontend": "auto", "example_input": [1, 4]}})
    with pytest.raises(TraceError) as e:
        api.trace_model(spec, DataDependent())
    message = str(e.value)
    assert "neither front-end can take DataDependent" in message
    assert message.count("test_export_frontend.py") >= 2 and "if y.sum() > 0:" in message
    assert "GuardOnDataDependentSymNode" in message


def test_mode_dependent_code_export_cannot_follow_is_refused():
    spec = parse_spec({"model": {"frontend": "export", "example_input": [1, 4]}})
    with pytest.raises(TraceError, match=r"does not behave like the original in eval\(\).*self.training"):
        api.trace_model(spec, StochasticDepth())


def test_export_leaves_the_users_model_alone(captured):
    torch.manual_seed(0)
    model = gpt2()
    before = copy.deepcopy(model.state_dict())
    model.eval()
    use_cache = model.config.use_cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = capture(model, "export", (ids(batch=2),))
    assert not model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.config.use_cache == use_cache  # switched off on the exported copy only
    assert all(p is not q for p, q in zip(gm.parameters(), model.parameters()))


@pytest.mark.parametrize("name", list(ZOO))
def test_the_capture_runs_where_it_is_moved(captured, name):
    """Export writes its device into arange/to; the graph reads the input's instead (the meta
    device stands in for a GPU here: a CPU tensor created in the graph would not mix)."""
    _, gm = captured[name]
    moved = copy.deepcopy(gm).to("meta").eval()
    out = moved(ids().to("meta"))
    assert out.device.type == "meta" and out.shape[0] == 3


def test_batch_norm_statistics_and_dropout_follow_the_mode_step_after_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                        nn.Linear(144, 2))
    x = torch.randn(4, 3, 8, 8)
    gm = capture(net, "export", (x,))
    assert list(layer_table(gm)) == ["0", "5"]
    for training in (True, False, True, True):
        assert torch.equal(run(gm, x, training, seed=3), run(net, x, training, seed=3))
        assert torch.equal(gm.get_buffer("1.running_mean"), net[1].running_mean)
        assert gm.get_buffer("1.num_batches_tracked").item() == net[1].num_batches_tracked.item()
    assert net[1].num_batches_tracked.item() == 3  # counted in train() only


def test_keyword_inputs_are_graph_inputs_by_name():
    torch.manual_seed(0)
    model = bert().eval()
    spec = spec_for([COMPANDER], example_kwargs={"attention_mask": {"shape": [1, TOKENS], "dtype": "int64",
                                                                     "high": 2}})
    gm = api.compile_spec(spec, model).graph_module.eval()
    x, mask = ids(), torch.ones(3, TOKENS, dtype=torch.long)
    mask[1, 5:] = 0
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    expected = logits(model(x, attention_mask=mask))
    torch.testing.assert_close(gm(x, attention_mask=mask), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(gm(x, attention_mask=mask), gm(x, torch.ones_like(mask)))  # the mask is read


def test_both_front_ends_agree_on_a_model_both_take():
    from examples.models.tiny_lm import build

    torch.manual_seed(0)
    model = build(vocab_size=VOCAB, block_size=TOKENS, dim=32, heads=2, layers=1, dropout=0.1)
    passes = [dict(COMPANDER, targets={"types": ["Linear"]}), PRUNE]  # (nn.Embedding starts N(0, 1): too wide)
    results = {f: api.compile_spec(spec_for(passes, frontend=f), model) for f in ("fx", "export")}
    assert list(layer_table(results["fx"].graph_module)) == list(layer_table(results["export"].graph_module))
    x = ids(tokens=TOKENS)
    for training in (False, True):  # sdpa's dropout_p and nn.Dropout, drawn in the same order
        assert torch.equal(run(results["fx"].graph_module, x, training), run(results["export"].graph_module, x, training))
    assert sorted(fold(results["fx"].graph_module).state_dict()) == sorted(model.state_dict())
    assert sorted(fold(results["export"].graph_module).state_dict()) == sorted(model.state_dict())
