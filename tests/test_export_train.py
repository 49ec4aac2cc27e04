"""A Hugging Face causal LM (LlamaForCausalLM from a config, examples/models/tiny_llama.py)
through the export front-end, the compander and GraNet masks, fxgrow's Trainer on the `text`
data source: a run crashed and resumed is bit-identical to an uninterrupted one, and the
folded state loads strictly into LlamaForCausalLM."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fxgrow import api
from fxgrow.specs.root import parse_spec
from fxgrow.train import Callback, Trainer
from tests.test_lm_train import pydocs_example_on_other_text
from tests.test_text import write_docs
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)
from tests.test_train_resume import metrics

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = str(ROOT / "examples" / "models" / "tiny_llama.py")


def lm_spec(folder: Path):
    return parse_spec({
        "model": {"frontend": "export", "example_input": {"shape": [1, 16], "dtype": "int64", "high": 257},
                  "kwargs": {"vocab_size": 257, "hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1, "ffn": 32,
                             "block_size": 16, "dropout": 0.1}},
        "passes": [{"kind": "compander", "adaptive_fix": True},
                   {"kind": "prune_regrow", "preset": "granet", "final_sparsity": 0.5,
                    "schedule": {"start": 0.0, "end": 0.75, "every": 2}}],
        "train": {"data": {"name": "text", "files": str(folder / "*.txt"), "block_size": 16, "test_fraction": 0.2},
                  "steps": 8, "batch_size": 4, "checkpoint_every_steps": 3, "log_every_steps": 2,
                  "eval_every_steps": 4, "optimizer": {"name": "adamw", "lr": 5e-3}, "progress": "none"}})


class Crash(Callback):
    name = "crash"

    def after_step(self, ctx):
        if ctx.step == 5:  # after the checkpoint at 3, before the pruning event at 6
            raise RuntimeError("crash")


def test_exported_lm_run_crashed_and_resumed_is_bit_identical(tmp_path):
    write_docs(tmp_path / "t", count=10, words=60)
    spec = lm_spec(tmp_path / "t")
    report = api.run(spec, TINY_LLAMA, out_dir=tmp_path / "a")
    assert report["objective"] == "causal_lm" and report["perplexity"] < 257

    spec_b = spec.model_copy(update={"model": spec.model.model_copy(update={"entry": TINY_LLAMA})})
    result = api.compile_spec(spec_b, api.build_model(spec_b))
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(result.graph_module, spec_b.train, callbacks=result.callbacks + [Crash()], out_dir=tmp_path / "b",
                spec_dump=api.spec_dump(spec_b)).fit()
    torch.manual_seed(1)  # everything must come from the checkpoint
    resumed = api.run(spec, TINY_LLAMA, out_dir=tmp_path / "b", resume=tmp_path / "b")

    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert resumed["perplexity"] == report["perplexity"]
    folded = [torch.load(tmp_path / n / "folded_state_dict.pt") for n in ("a", "b")]
    assert folded[0].keys() == folded[1].keys() and all(torch.equal(folded[0][k], folded[1][k]) for k in folded[0])
    # the folded run loads into the user's class: the pruned weights are zeros in it
    model = transformers.LlamaForCausalLM(api.build_model(spec_b).config)
    model.load_state_dict(folded[0], strict=True)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert 0.3 < (q == 0).float().mean().item() < 0.7
    saved = torch.load(tmp_path / "a" / "folded.pt", weights_only=False)  # the pickled GraphModule
    x = torch.randint(0, 257, (2, 16))
    assert torch.equal(saved.eval()(x), model.eval()(x).logits)
    records = json.loads((tmp_path / "a" / "report.json").read_text())
    assert records["coverage"]["passes.0"]["untouched"] == [] and records["artifacts"]["folded"] == "folded.pt"
    assert records["frontend"] == "export"
    # `fxgrow fold RUN`: the checkpoint restored through a fresh export, folded again, the same state
    from typer.testing import CliRunner

    from fxgrow.cli.main import app

    result = CliRunner().invoke(app, ["fold", str(tmp_path / "b"), TINY_LLAMA, "-o", str(tmp_path / "again.pt")])
    assert result.exit_code == 0, result.output
    again = torch.load(tmp_path / "again_state_dict.pt")
    assert again.keys() == folded[1].keys() and all(torch.equal(again[k], folded[1][k]) for k in again)


def test_cli_inspects_an_exported_model(tmp_path):
    from typer.testing import CliRunner

    from fxgrow.cli.main import app

    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  frontend: export\n  example_input: {shape: [1, 16], dtype: int64, high: 64}\n"
                    "  kwargs: {vocab_size: 64, hidden: 16, layers: 1, heads: 2, kv_heads: 1, ffn: 32, block_size: 16}\n"
                    "passes:\n  - kind: compander\n")
    result = CliRunner().invoke(app, ["inspect", TINY_LLAMA, str(spec)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for weight in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert weight in result.output
    assert "compander" in result.output


def test_the_pydocs_llama_example_runs_on_other_text(tmp_path, monkeypatch):
    """examples/tiny_llama_pydocs.yaml as written, but on text written here and for 4 steps
    (CI has no python3.11-doc)."""
    d = pydocs_example_on_other_text("tiny_llama_pydocs.yaml", tmp_path, monkeypatch, steps=4)
    d["passes"][1]["schedule"]["every"] = 1  # (25 steps of 4 would be one-shot pruning, which the spec refuses)
    spec = parse_spec(d)
    assert spec.model.frontend == "export" and spec.model.example.high == spec.model.kwargs["vocab_size"]
    report = api.run(spec, TINY_LLAMA, out_dir=tmp_path / "run")
    assert report["objective"] == "causal_lm" and report["data"]["tokenizer"] == "bpe"
    assert {entry["kind"] for entry in report["coverage"].values()} == {"compander", "prune_regrow"}


def test_exported_lm_trains_under_bf16_autocast(tmp_path):
    write_docs(tmp_path / "t", count=10, words=60)
    d = api.spec_dump(lm_spec(tmp_path / "t"))
    d["train"].update(precision="bf16", steps=3)
    d["passes"][1]["schedule"]["every"] = 1
    report = api.run(parse_spec(d), TINY_LLAMA, out_dir=tmp_path / "run")
    assert 1 < report["perplexity"] < 257 * 2
