"""Objectives in the loop: the causal-LM loss against a hand computation and Hugging Face's
`labels=` convention, perplexity from summed token losses, a tiny causal LM trained on
text (bf16, resume, DDP, passes, CLI), sequence classification on token ids, and token
example inputs."""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow import api
from fxgrow.errors import FxgrowError, SpecError
from fxgrow.specs.root import parse_spec
from fxgrow.specs.train import TrainSpec
from fxgrow.train import Trainer
from fxgrow.train.data import Data, DataError
from fxgrow.train.loop import test_sums as eval_sums_of
from fxgrow.train.objectives import IGNORE_INDEX, CausalLM, Classification, perplexity
from examples.models.tiny_lm import build as tiny_lm
from tests.test_text import write_docs
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)
from tests.test_train_resume import assert_same_parameters, crash_and_resume, metrics

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = str(ROOT / "examples" / "models" / "tiny_lm.py")


def hand_causal_lm(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int, int]:
    """(mean NLL, correct, counted) with explicit loops: position t predicts ids[t + 1]."""
    total, correct, count = 0.0, 0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            target = int(ids[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            total -= (row[target] - torch.logsumexp(row, 0)).item()
            correct += int(row.argmax()) == target
            count += 1
    return total / count, correct, count


def test_causal_lm_loss_is_next_token_cross_entropy_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    ids[0, 4:] = IGNORE_INDEX  # padding
    ids[2, 1] = IGNORE_INDEX
    loss, sums = CausalLM(11).train_terms(logits, ids)
    mean, correct, count = hand_causal_lm(logits, ids)
    assert loss.item() == pytest.approx(mean, rel=1e-6)
    assert sums[1:].tolist() == [correct, count] == [correct, 3 * 5 - 2 - 1]
    assert sums[0].item() == pytest.approx(mean * count, rel=1e-6)
    assert CausalLM().eval_sums(logits, ids)[0].item() == pytest.approx(mean * count, rel=1e-6)
    smoothed, _ = CausalLM().train_terms(logits, ids, label_smoothing=0.1)
    keep = ids[:, 1:].flatten() != IGNORE_INDEX
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1)[keep], ids[:, 1:].flatten()[keep], label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-6)


def test_causal_lm_loss_equals_hugging_face_labels_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[1, 8:] = IGNORE_INDEX  # HF's convention for padding
    with torch.no_grad():
        out = model(ids, labels=labels)
    ours, _ = CausalLM(64).train_terms(out, labels)  # the output object itself: its .logits
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_perplexity_is_exp_of_summed_token_loss_over_counted_tokens():
    g = torch.Generator().manual_seed(1)
    vocab = 9
    ids = torch.randint(0, vocab, (5, 7), generator=g)
    ids[3, 2:] = IGNORE_INDEX  # batches count different numbers of tokens
    table = torch.randn(vocab, vocab, generator=g)
    model = nn.Embedding(vocab, vocab)
    model.weight.data.copy_(table)
    batches = [(ids[:1], ids[:1]), (ids[1:4], ids[1:4]), (ids[4:], ids[4:])]
    safe = lambda x: x.clamp_min(0)  # noqa: E731  (inputs never hold the ignore index)
    objective = CausalLM(vocab)
    sums = eval_sums_of(model, batches, safe, contextlib.nullcontext, torch.device("cpu"), objective)
    metrics = objective.metrics(sums.tolist())
    mean, correct, count = hand_causal_lm(model(safe(ids)).detach(), ids)
    assert metrics["perplexity"] == pytest.approx(math.exp(mean), rel=1e-6)  # float32 logits
    assert metrics["accuracy"] == correct / count and metrics["loss"] == pytest.approx(mean, rel=1e-6)
    per_batch = [math.exp(hand_causal_lm(model(safe(x)).detach(), y)[0]) for x, y in batches]
    assert abs(sum(per_batch) / len(per_batch) - metrics["perplexity"]) > 1e-3  # not a mean of batch perplexities
    uniform = CausalLM(50).metrics(CausalLM(50).eval_sums(torch.zeros(2, 8, 50), torch.zeros(2, 8, dtype=torch.long))
                                   .tolist())
    assert uniform["perplexity"] == pytest.approx(50, rel=1e-6)
    assert perplexity(1000.0) == math.inf and math.isnan(perplexity(math.nan))


def test_objective_shape_and_width_errors():
    with pytest.raises(FxgrowError, match=r"causal_lm needs logits \[batch, tokens, vocab\].*got logits \[4, 10\]"):
        CausalLM().train_terms(torch.zeros(4, 10), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(FxgrowError, match="the model predicts 100 classes but the data has 257 .train.data.vocab_size"):
        CausalLM(257).train_terms(torch.zeros(1, 4, 100), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(FxgrowError, match="returned str"):
        Classification().train_terms("nope", torch.zeros(2, dtype=torch.long))


# --- the loop on text ------------------------------------------------------------------------

def lm_spec(folder: Path, **kw) -> TrainSpec:
    base = dict(data={"name": "text", "files": str(folder / "*.txt"), "block_size": 16, "test_fraction": 0.2},
                batch_size=8, steps=30, optimizer={"name": "adamw", "lr": 5e-3}, schedule={"warmup_steps": 3},
                log_every_steps=10, eval_every_steps=15, progress="none")
    return TrainSpec(**{**base, **kw})


def small_lm(dropout: float = 0.0, vocab: int = 257):
    return tiny_lm(vocab_size=vocab, block_size=16, dim=32, heads=2, layers=1, dropout=dropout)


class IdsOnly(nn.Module):
    """Fails unless the inputs are int64 token ids (no float cast, no channels_last)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        assert ids.dtype == torch.int64 and ids.is_contiguous(), (ids.dtype, ids.stride())
        return self.inner(ids)


def test_tiny_lm_learns_text_and_reports_perplexity(tmp_path):
    write_docs(tmp_path / "t", count=12, words=120)
    s = lm_spec(tmp_path / "t", steps=60, channels_last=True)
    torch.manual_seed(0)
    model = IdsOnly(small_lm())
    trainer = Trainer(model, s, out_dir=tmp_path / "run")
    before = None

    class First(fxgrow.train.Callback):
        name = "first"

        def on_train_start(self, ctx):
            nonlocal before
            before = ctx.evaluate()

    trainer.callbacks.append(First())
    report = trainer.fit()
    assert report["objective"] == "causal_lm" and report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert before["perplexity"] > 150 and report["perplexity"] < 15  # 257-way guessing -> the words' letters
    assert report["data"]["tokenizer"] == "byte" and report["data"]["train"]["blocks"] == len(trainer.data.train[0])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records][:3] == [(10, "train"), (15, "test"), (20, "train")]
    assert all({"loss", "accuracy", "perplexity"} <= set(r) for r in records)
    assert all(r["perplexity"] == pytest.approx(math.exp(r["loss"])) for r in records)


def test_bf16_and_label_smoothing_on_an_lm(tmp_path, capsys):
    write_docs(tmp_path / "t", count=12, words=60)
    report = Trainer(small_lm(), lm_spec(tmp_path / "t", precision="bf16", label_smoothing=0.1, steps=20,
                                         progress="plain"), out_dir=tmp_path / "run").fit()
    assert math.isfinite(report["perplexity"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].endswith(f"loss {report['loss']:.4f}  acc {report['accuracy']:.4f}  "
                              f"ppl {report['perplexity']:.2f}") and lines[-1].startswith("eval  step 20")
    assert not any("ppl" in line for line in lines if line.startswith("step "))
    train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert train and all("perplexity" not in r for r in train)  # a smoothed loss is no likelihood


@pytest.mark.slow
def test_compiled_lm_training_matches_eager(tmp_path):
    write_docs(tmp_path / "t", count=12, words=60)
    reports = []
    for compile in (False, True):
        torch.manual_seed(0)
        reports.append(Trainer(small_lm(), lm_spec(tmp_path / "t", steps=10, compile=compile),
                               out_dir=tmp_path / str(compile)).fit())
    assert reports[0]["perplexity"] == pytest.approx(reports[1]["perplexity"], rel=1e-3)


def test_lm_run_crashed_and_resumed_is_bit_identical(tmp_path):
    write_docs(tmp_path / "t", count=12, words=60)
    s = lm_spec(tmp_path / "t", steps=12, checkpoint_every_steps=3, log_every_steps=2, eval_every_steps=5)
    reference, resumed = crash_and_resume(s, tmp_path, build=lambda: small_lm(dropout=0.1))
    assert_same_parameters(reference, resumed)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("a", "b")]
    assert reports[0]["perplexity"] == reports[1]["perplexity"]


def test_model_narrower_than_the_vocabulary_is_refused(tmp_path):
    write_docs(tmp_path / "t", count=6)
    with pytest.raises(FxgrowError, match=r"failed on token ids up to \d+ .*vocabulary has 257 ids .train.data.vocab_"):
        Trainer(small_lm(vocab=100), lm_spec(tmp_path / "t"), out_dir=tmp_path / "run").fit()
    narrow_head = small_lm()
    narrow_head.head = nn.Linear(32, 200)
    with pytest.raises(FxgrowError, match="predicts 200 classes but the data has 257 .train.data.vocab_size"):
        Trainer(narrow_head, lm_spec(tmp_path / "t"), out_dir=tmp_path / "run").fit()


# --- sequence classification on token ids ----------------------------------------------------

def token_classes(n: int = 96, seed: int = 0):
    """Sequences of ids; the label is which of the ids 1, 2, 3 occurs most often."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 20, (n, 10), generator=g)
    y = torch.arange(n) % 3
    ids[:, :4] = (y + 1)[:, None]
    return ids[:, torch.randperm(10, generator=g)], y


def token_splits():
    return {"train": torch.utils.data.TensorDataset(*token_classes(96, 0)),
            "test": torch.utils.data.TensorDataset(*token_classes(48, 1)), "num_classes": 3}


class BagOfTokens(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 16, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def test_sequence_classification_on_token_ids(tmp_path):
    s = TrainSpec(data={"name": "python", "entry": "tests.test_lm_train:token_splits", "workers": 0},
                  epochs=15, batch_size=16, optimizer={"name": "adamw", "lr": 0.03}, progress="none",
                  channels_last=True)
    assert s.objective_name == "classification"
    report = Trainer(IdsOnly(BagOfTokens()), s, out_dir=tmp_path).fit()
    assert report["objective"] == "classification" and "perplexity" not in report
    assert report["accuracy"] > 0.9


def test_augmenting_token_ids_is_refused():
    data = Data(token_classes(8), token_classes(8), 3, augment="crop_flip")
    with pytest.raises(DataError, match="train.data.augment: crop_flip works on images; these inputs are integer"):
        data.prepare(data.train[0], torch.Generator())


# --- token example inputs, passes, CLI -------------------------------------------------------

def test_passes_rewrite_a_token_model(tmp_path):
    spec = parse_spec({"model": {"example_input": {"shape": [1, 16], "dtype": "int64", "high": 257}},
                       # (embeddings start N(0, 1): outside 0.7 * atan's range, so linears only)
                       "passes": [{"kind": "compander", "a": 0.7, "b": 0.8, "targets": {"types": ["Linear"]}},
                                  {"kind": "prune_regrow", "final_sparsity": 0.5,
                                   "schedule": {"start": 0.0, "end": 0.5, "every": 5}}]})
    model = small_lm().eval()
    gm = api.compile_spec(spec, model).graph_module.eval()
    x = api.example_input(spec, batch=3)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-5)


LM_YAML = """\
name: lm
model:
  example_input: {{shape: [1, 16], dtype: int64, high: 257}}
  kwargs: {{vocab_size: 257, block_size: 16, dim: 32, heads: 2, layers: 1}}
passes:
  - kind: compander
    targets: {{types: [Linear]}}
train:
  data: {{name: text, files: "{files}", block_size: 16, test_fraction: 0.2}}
  steps: 12
  batch_size: 8
  optimizer: {{name: adamw, lr: 0.005}}
  progress: none
"""


def test_cli_apply_and_eval_an_lm_spec(tmp_path):
    from typer.testing import CliRunner

    from fxgrow.cli.main import app

    write_docs(tmp_path / "t", count=8, words=60)
    spec = tmp_path / "lm.yaml"
    spec.write_text(LM_YAML.format(files=tmp_path / "t" / "*.txt"))
    runner = CliRunner()
    result = runner.invoke(app, ["apply", str(spec), TINY_LM, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert f"test perplexity {report['perplexity']:.2f}, token accuracy {report['accuracy']:.4f}" in result.output
    assert (tmp_path / "run" / "folded.pt").is_file()
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "run")])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"perplexity {report['perplexity']:.2f}" in evaluated.output


# --- DDP -------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch built without gloo")
def test_two_rank_bpe_lm_matches_one_process(tmp_path):
    from tests.test_train_resume import DRIVER, driver_env

    write_docs(tmp_path / "t", count=12, words=80)
    env = {**driver_env(), "FXGROW_CACHE": str(tmp_path / "cache")}
    args = lambda name: [str(DRIVER), "--model", "lm", "--text", str(tmp_path / "t"),  # noqa: E731
                         "--out", str(tmp_path / name), "--final", str(tmp_path / f"{name}.pt")]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                         + args("ddp"), env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable] + args("single"), env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "ddp.rank0.pt"), torch.load(tmp_path / "ddp.rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    reference = torch.load(tmp_path / "single.pt")
    for k in reference:
        torch.testing.assert_close(rank0[k], reference[k], rtol=0, atol=1e-5)
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("ddp", "single")]
    assert not reports[0]["data"].pop("cached") and reports[1]["data"].pop("cached")  # rank 0 trained the BPE
    assert reports[0]["data"] == reports[1]["data"]
    assert reports[0]["perplexity"] == pytest.approx(reports[1]["perplexity"], rel=1e-4)


def pydocs_example_on_other_text(name: str, tmp_path: Path, monkeypatch, steps: int) -> dict:
    """The example spec `examples/<name>` as a dict, reading text written here (CI has no
    python3.11-doc), for `steps` steps of 2 blocks, with its BPE cached under tmp_path."""
    import yaml

    monkeypatch.setenv("FXGROW_CACHE", str(tmp_path / "cache"))
    write_docs(tmp_path / "t", count=12, words=400)
    d = yaml.safe_load((ROOT / "examples" / name).read_text())
    d["train"]["data"].update(files=str(tmp_path / "t" / "*.txt"), max_test_tokens=256, test_fraction=0.2)
    d["train"].update(steps=steps, batch_size=2, progress="none")
    return d


def test_the_pydocs_example_runs_on_other_text(tmp_path, monkeypatch):
    """examples/tiny_lm_pydocs.yaml as written, but on text written here and for 2 steps
    (CI has no python3.11-doc)."""
    spec = parse_spec(pydocs_example_on_other_text("tiny_lm_pydocs.yaml", tmp_path, monkeypatch, steps=2))
    assert spec.model.example.high == spec.train.data.vocab == spec.model.kwargs["vocab_size"]
    report = api.run(spec, TINY_LM, out_dir=tmp_path / "run")
    assert report["objective"] == "causal_lm" and report["data"]["tokenizer"] == "bpe"
