"""`fxgrow extract RUN --at ...` on a run of a Hugging Face model (the export front-end):
besides the plain sliced GraphModule it writes the sub-model as the run's own class from a
smaller config (save_pretrained: config.json + weights) that AutoModelFor*.from_pretrained
loads offline, with the GraphModule's logits exactly (fp32, eval); where the config cannot
say the sub-model, only the GraphModule is written and the reason names the config field."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fxgrow import api
from fxgrow.cli.main import app
from fxgrow.specs.root import parse_spec
from tests.test_text import write_docs
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"


def test_extract_of_a_sorted_llama_run_writes_a_loadable_llama(tmp_path, one_thread):  # noqa: F811
    write_docs(tmp_path / "t", count=10, words=60)
    spec = parse_spec({
        "model": {"frontend": "export", "example_input": {"shape": [1, 16], "dtype": "int64", "high": 257},
                  "kwargs": {"vocab_size": 257, "hidden": 16, "layers": 3, "heads": 4, "kv_heads": 2, "ffn": 32,
                             "block_size": 16}},
        "passes": [{"kind": "sorted_slicing", "heads": {"fractions": [0.5, 1.0]}, "ffn": {"fractions": [0.25, 1.0]},
                    "depth": {"blocks": [1, 3], "by": "layers"}}],
        "train": {"data": {"name": "text", "files": str(tmp_path / "t" / "*.txt"), "block_size": 16,
                           "test_fraction": 0.2},
                  "steps": 4, "batch_size": 4, "optimizer": {"name": "adamw", "lr": 5e-3}, "progress": "none"}})
    api.run(spec, str(MODELS / "tiny_llama.py"), out_dir=tmp_path / "run")

    result = CliRunner().invoke(app, ["extract", str(tmp_path / "run"), "--at", "heads=0.5,ffn=0.25,depth=1"])
    assert result.exit_code == 0, result.output
    target = tmp_path / "run" / "subnet_heads0.5_ffn0.25_d1.pt"
    folder = tmp_path / "run" / "subnet_heads0.5_ffn0.25_d1_hf"
    assert f"wrote {folder}/" in result.output.replace("\n", "")
    small = torch.load(target, weights_only=False).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    cfg = hf.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
            cfg.hidden_size, cfg.head_dim) == (1, 2, 1, 8, 16, 4)
    x = torch.randint(0, 257, (3, 16))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, small(x))
    # the full model from the same run: every size of the original config
    result = CliRunner().invoke(app, ["extract", str(tmp_path / "run"), "-o", str(tmp_path / "full.pt")])
    assert result.exit_code == 0, result.output
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full_hf")
    assert full.config.num_hidden_layers == 3 and full.config.intermediate_size == 32


def test_extract_says_which_config_field_cannot_express_the_sub_model(tmp_path):
    """BERT's head size is hidden_size // num_attention_heads: a narrower hidden stream with
    every head whole has no BertConfig, so only the GraphModule is written."""
    spec = {"model": {"entry": str(MODELS / "tiny_bert.py"), "frontend": "export",
                      "example_input": {"shape": [1, 16], "dtype": "int64", "high": 97},
                      "kwargs": {"vocab_size": 97, "hidden": 32, "layers": 2, "heads": 4, "ffn": 64,
                                 "block_size": 16, "labels": 2}},
            "passes": [{"kind": "sorted_slicing", "hidden": {"fractions": [0.5, 1.0]}}],
            "train": {"data": {"name": "digits"}, "steps": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["extract", str(path), "--at", "hidden=0.5", "-o", str(tmp_path / "s.pt")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "no BertForSequenceClassification written" in text and "BertConfig.hidden_size" in text, text
    assert (tmp_path / "s.pt").is_file() and not (tmp_path / "s_hf").exists()


def test_session_extract_takes_dimensions_by_name():
    from fxgrow.session import Session
    from fxgrow.subnets import extract

    session = Session({"model": {"example_input": {"shape": [1, 16], "dtype": "int64", "high": 97},
                                 "kwargs": {"vocab_size": 97, "block_size": 16, "dim": 16, "heads": 2, "layers": 2}},
                       "passes": [{"kind": "sorted_slicing", "heads": {"fractions": [0.5, 1.0]},
                                   "ffn": {"fractions": [0.5, 1.0]}, "depth": {"blocks": [1, 2], "by": "layers"}}],
                       "train": {"data": {"name": "digits"}, "steps": 1}},
                      str(MODELS / "tiny_lm.py"))
    small = session.extract(heads=0.5, depth=1)
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(small(x), extract(session.model, heads=0.5, ffn=1.0, depth=1)(x))
    assert small.get_submodule("blocks.0.attn.q").out_features == 8
    assert small.get_submodule("blocks.0.fc1").out_features == 64


def test_the_sorted_llama_example_extracts_its_smallest_point_as_a_llama(tmp_path, monkeypatch, one_thread):  # noqa: F811
    """examples/sorted_llama_pydocs.yaml as written (hidden x heads x FFN x depth by layers,
    every_depth), on text written here for 2 steps; `extract --at` its smallest point."""
    from tests.test_lm_train import pydocs_example_on_other_text

    d = pydocs_example_on_other_text("sorted_llama_pydocs.yaml", tmp_path, monkeypatch, steps=2)
    report = api.run(parse_spec(d), str(MODELS / "tiny_llama.py"), out_dir=tmp_path / "run")
    assert len(report["sorted_slicing"]["grid"]) == 16
    point = "hidden=0.5,heads=0.5,ffn=0.5,depth=1"
    result = CliRunner().invoke(app, ["extract", str(tmp_path / "run"), "--at", point, "-o", str(tmp_path / "s.pt")])
    assert result.exit_code == 0, result.output
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s_hf").eval()
    cfg = hf.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.head_dim) == (1, 32, 2, 1, 96, 16)
    x = torch.randint(0, 1024, (2, 128))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, torch.load(tmp_path / "s.pt", weights_only=False).eval()(x))
    # a language model's grid table shows each sub-model's perplexity, as report.json holds it
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--grid"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output
    smallest = report["sorted_slicing"]["grid"][0]
    assert f"{smallest['perplexity']:.2f}" in result.output
