"""fxgrow's passes in the Hugging Face Trainer: SortedNet on an MLP (widths 16 to 128 trained
at once, four sub-models a step), digits, CPU, under a minute; then the grid of sub-models
and one extracted as a standalone model. HF's own checkpoints every `--save-steps`;
`--resume DIR` continues one exactly. Any spec works (--spec, --model).

    pip install 'fxgrow[hf]'
    python examples/integrations/hf_sorted.py [--epochs 8] [--out runs/hf_sorted]
    python examples/integrations/hf_sorted.py --resume runs/hf_sorted/checkpoint-88
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download here

import torch
import torch.nn.functional as F
from transformers import TrainingArguments

import fxgrow
from fxgrow.integrations.hf import FxgrowTrainer
from fxgrow.subnets import data_evaluator
from fxgrow.train.data import load_data

ROOT = Path(__file__).resolve().parents[2]


class Digits(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class DigitsTrainer(FxgrowTrainer):
    """The model returns logits: the loss is ours."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["x"])
        loss = F.cross_entropy(logits, inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples/sorted_mlp_digits.yaml"))
    parser.add_argument("--model", default=str(ROOT / "examples/models/mlp.py"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=44)
    parser.add_argument("--out", default="runs/hf_sorted")
    parser.add_argument("--resume", default=None, help="a checkpoint-N folder this script wrote")
    args = parser.parse_args(argv)

    spec = fxgrow.load_spec(args.spec)
    data = load_data(spec.train.data)                  # digits: scikit-learn's, no download
    x, y = data.train
    evaluate = data_evaluator(data, 256, torch.device("cpu"))
    session = fxgrow.Session(spec, args.model, evaluate=evaluate)  # the run's length comes from the Trainer
    trainer = DigitsTrainer(
        session=session,
        args=TrainingArguments(output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=64,
                               learning_rate=0.05, remove_unused_columns=False, dataloader_drop_last=True,
                               save_strategy="steps", save_steps=args.save_steps, logging_steps=22,
                               report_to=[], use_cpu=True, disable_tqdm=True),
        train_dataset=Digits(data.prepare(x), y),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}))
    trainer.train(resume_from_checkpoint=args.resume)

    report = trainer.fxgrow_callback.report
    for row in report["sorted_slicing"]["grid"]:
        print(f"width {row['width']:<5} accuracy {row['accuracy']:.3f}  params {row['params']}")
    smallest = min(row["width"] for row in report["sorted_slicing"]["grid"])
    sub = session.extract(width=smallest)              # a plain, physically smaller model
    torch.save(sub.state_dict(), Path(args.out) / f"subnet_w{smallest}_state_dict.pt")
    print(f"extracted width {smallest}: {sum(p.numel() for p in sub.parameters())} parameters, test accuracy "
          f"{evaluate(sub)['accuracy']:.3f}; saved in {args.out}")
    return {"report": report, "session": session, "subnet": sub}


if __name__ == "__main__":
    main()
