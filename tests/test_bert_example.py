"""examples/tiny_bert_corpus.yaml (a BertForSequenceClassification from a config, through the
export front-end, companded and GraNet-masked, on labelled text) as written but on two
folders of text written here (CI has no python3.11-doc or fortunes), for a few steps: it
trains the classification objective, and the folded state loads strictly into
BertForSequenceClassification."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fxgrow import api
from fxgrow.specs.root import parse_spec
from tests.test_text import write_docs
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY_BERT = str(ROOT / "examples" / "models" / "tiny_bert.py")


def test_the_corpus_bert_example_runs_on_other_text(tmp_path, monkeypatch):
    monkeypatch.setenv("FXGROW_CACHE", str(tmp_path / "cache"))
    write_docs(tmp_path / "a", count=8, words=300, seed=1)
    for i, text in enumerate(write_docs(tmp_path / "b", count=8, words=300, seed=2)):
        (tmp_path / "b" / f"doc{i:02d}.txt").write_text(text.upper())  # a second "corpus"
    d = yaml.safe_load((ROOT / "examples" / "tiny_bert_corpus.yaml").read_text())
    d["train"]["data"].update(files=[str(tmp_path / "a" / "*.txt"), str(tmp_path / "b" / "*.txt")],
                              max_tokens=1024, max_test_tokens=256, test_fraction=0.25)
    d["train"].update(steps=4, batch_size=4, progress="none")
    d["passes"][1]["schedule"]["every"] = 1  # (25 steps of 4 would be one-shot pruning, which the spec refuses)
    spec = parse_spec(d)
    assert spec.train.objective_name == "classification" and spec.model.frontend == "export"
    report = api.run(spec, TINY_BERT, out_dir=tmp_path / "run")
    assert report["objective"] == "classification" and 0 <= report["accuracy"] <= 1
    classes = report["data"]["classes"]
    assert [c["train"]["tokens"] for c in classes] == [1024, 1024]  # balanced by the per-class cap
    assert {entry["kind"] for entry in report["coverage"].values()} == {"compander", "prune_regrow"}
    assert all(entry["untouched"] == [] for entry in report["coverage"].values())
    folded = torch.load(tmp_path / "run" / "folded_state_dict.pt")
    model = transformers.BertForSequenceClassification(api.build_model(spec, TINY_BERT).config)
    model.load_state_dict(folded, strict=True)
    saved = torch.load(tmp_path / "run" / "folded.pt", weights_only=False)
    x = torch.randint(0, spec.model.kwargs["vocab_size"], (2, 64))
    assert torch.equal(saved.eval()(x), model.eval()(x).logits)
    q = model.bert.encoder.layer[0].attention.self.query.weight
    assert 0.1 < (q == 0).float().mean().item() < 0.9  # GraNet's masks folded in as zeros
