"""A small training run for the tests that need a separate process: kill-and-resume
(SIGKILL at a random step) and DDP under torchrun. Prints `step N` after every optimizer
step and saves the final parameters to --final (one file per rank under DDP); under DDP
each rank also prints, on stderr, the threads its process still runs once fit() has
returned (`threads after fit: ...`, Linux). The caller puts fxgrow on PYTHONPATH.

    python tests/train_driver.py --out DIR --final F.pt [--resume] [--model conv|mlp|lm] [--crash-after N]

`--model lm` trains a tiny causal LM on the `*.txt` files in `--text DIR` (a BPE tokenizer).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fxgrow.specs.train import TextData, TrainSpec
from fxgrow.train import Callback, Trainer


class Announce(Callback):
    """Has state that evolves with random draws, asks for two micro-steps, and says
    which step finished (the test kills the process on that signal)."""

    name = "announce"

    def __init__(self, crash_after: int | None = None):
        self.draws = torch.zeros(())
        self.crash_after = crash_after

    def micro_steps(self, ctx) -> int:
        return 2

    def on_micro_step(self, ctx, index: int) -> None:
        self.draws += torch.rand(())  # global RNG: must be restored exactly on resume

    def after_step(self, ctx) -> None:
        if ctx.rank == 0:
            print(f"step {ctx.step}", flush=True)
        if ctx.step == self.crash_after:  # every rank dies at once, as on a lost node: no cleanup
            os._exit(3)

    def state_dict(self):
        return {"draws": self.draws.clone()}

    def load_state_dict(self, state, ctx=None):
        self.draws = state["draws"].clone()

    def report(self):
        return {"draws": float(self.draws)}


def threads_after_fit() -> list[str] | None:
    """The names of this process's threads (None where /proc does not list them). A joined
    thread leaves /proc a moment after join() returns, so gloo's get up to 5 s to go; those
    of a group that outlived fit() stay for good."""
    def names() -> list[str] | None:
        tasks = Path("/proc/self/task")
        if not tasks.is_dir():
            return None
        found = []
        for task in tasks.iterdir():
            try:
                found.append((task / "comm").read_text().strip())
            except OSError:  # that thread ended meanwhile
                pass
        return sorted(found)
    threads = names()
    for _ in range(50):
        if not threads or not any("gloo" in name for name in threads):
            break
        time.sleep(0.1)
        threads = names()
    return threads


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "lm":
        from examples.models.tiny_lm import build as tiny_lm
        return tiny_lm(vocab_size=300, block_size=16, dim=16, heads=2, layers=1)
    if kind == "mlp":  # no batch statistics, no dropout: DDP equals one process up to rounding
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.Tanh(), nn.Linear(32, 4))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--final", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--model", choices=["conv", "mlp", "lm"], default="conv")
    parser.add_argument("--text", type=Path, help="--model lm: the folder of *.txt files")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--crash-after", type=int, help="exit abruptly (every rank) after this step")
    args = parser.parse_args()
    torch.set_num_threads(1)

    optimizer = {"name": "sgd", "lr": 0.05, "nesterov": True} if args.optimizer == "sgd" else {"name": "adamw"}
    spec = TrainSpec(
        data={"name": "synthetic", "shape": [3, 8, 8], "num_classes": 4, "train_size": 160, "test_size": 64,
              "augment": "crop_flip", "crop_padding": 1},
        epochs=args.epochs, batch_size=16, optimizer=optimizer, schedule={"warmup_steps": 5},
        checkpoint_every_steps=3, log_every_steps=4, progress="none")
    if args.model == "lm":
        spec = spec.model_copy(update={"data": TextData(files=[str(args.text / "*.txt")], tokenizer="bpe",
                                                        vocab_size=300, block_size=16, test_fraction=0.2)})
    trainer = Trainer(build(args.model), spec, callbacks=[Announce(args.crash_after)], out_dir=args.out,
                      resume=args.out if args.resume else None)
    trainer.fit()
    threads = threads_after_fit()
    if trainer.world > 1 and threads is not None:  # a process group fit() made should be gone with its threads
        # One write(2) of under PIPE_BUF bytes: the ranks share torchrun's stderr, and a line
        # written in pieces (as print may) can interleave with the other rank's.
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"rank {trainer.rank} threads after fit: {' '.join(threads)}\n".encode())
    final = args.final if trainer.world == 1 else args.final.with_suffix(f".rank{trainer.rank}.pt")
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, final)


if __name__ == "__main__":
    main()
