"""The fxgrow training loop vs a hand-written PyTorch loop doing the same work: a
CIFAR-shaped ResNet-18 (examples/models/resnet_cifar.py), SGD with Nesterov momentum and
weight decay, a cosine schedule, bf16 autocast and channels_last on CUDA, batches indexed
out of a dataset held on the device, the loss read back every 50 steps. Goal (issue 3):
the loop within 5% of the hand-written one on a GPU.

    python bench/bench_loop.py                    # full size (meant for a GPU)
    python bench/bench_loop.py --small            # a narrow net, few steps: runs on a CPU
    python bench/bench_loop.py --compile yes --json out.json

Each variant is timed over `--steps` optimizer steps after `--warmup` steps (wall clock
between two device synchronizations, so it includes everything the loop does per
step), alternating hand/loop for `--rounds` rounds in one process; the median per-step
time of each is reported with the ratio loop/hand.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fxgrow.specs.train import TrainSpec
from fxgrow.train import Callback, Trainer
from fxgrow.train.data import Data, epoch_permutation

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_parser, device_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 50


def resnet18(width: int) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("resnet_cifar", ROOT / "examples" / "models" / "resnet_cifar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(depth=18, width=width)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(model, data: Data, args, device: torch.device) -> float:
    """Seconds per step of the plain loop over steps warmup..warmup+steps."""
    cuda = device.type == "cuda"
    model = model.to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    x_all, y_all = data.train
    perm = epoch_permutation(len(y_all), 0, 0).to(device)
    for step in range(total):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        index = perm[step * args.batch:(step + 1) * args.batch]
        x, y = x_all[index], y_all[index]
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % LOG_EVERY == 0:
            loss.item()
    sync(device)
    return (time.perf_counter() - start) / args.steps


class StepTimer(Callback):
    name = "timer"

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps

    def after_step(self, ctx):
        if ctx.step == self.warmup:
            sync(ctx.device)
            self.start = time.perf_counter()
        elif ctx.step == self.warmup + self.steps:
            sync(ctx.device)
            self.per_step = (time.perf_counter() - self.start) / self.steps


def fxgrow_loop(model, data: Data, args, out_dir: Path) -> float:
    spec = TrainSpec(data="synthetic", steps=args.warmup + args.steps, batch_size=args.batch,
                     optimizer={"name": "sgd", "lr": args.lr, "nesterov": True}, compile=args.compile,
                     eval_every_epochs=None, checkpoint=False, log_every_steps=LOG_EVERY, progress="none")
    timer = StepTimer(args.warmup, args.steps)
    Trainer(model, spec, [timer], out_dir=out_dir, data=data, overwrite=True).fit()  # one folder, every repeat
    return timer.per_step


def main() -> None:
    parser = bench_parser(__doc__, full_batch=256, small_batch=32, compile_default="no")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_loop"), help="the loop's run folder")
    args = parser.parse_args()
    args.compile = args.compile == "yes"  # one mode per run: the loop compiles or it does not
    small = dict(batch=32, width=16, steps=8, warmup=3)
    full = dict(batch=256, width=64, steps=100, warmup=20 if not args.compile else 40)
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    n = args.batch * (args.warmup + args.steps)
    g = torch.Generator().manual_seed(0)
    data = Data((torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)),
                (torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)),
                10).to(device)
    torch.manual_seed(0)
    base = resnet18(args.width)
    hand, loop = [], []
    for r in range(args.rounds):
        hand.append(hand_loop(copy.deepcopy(base), data, args, device))
        loop.append(fxgrow_loop(copy.deepcopy(base), data, args, args.out))
        print(f"round {r}: hand {hand[-1] * 1e3:.2f} ms/step  loop {loop[-1] * 1e3:.2f} ms/step", flush=True)
    result = {
        "device": device_name(device), "torch": torch.__version__, "batch": args.batch, "width": args.width,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "compile": args.compile,
        "hand_ms": statistics.median(hand) * 1e3, "loop_ms": statistics.median(loop) * 1e3,
    }
    result["ratio"] = result["loop_ms"] / result["hand_ms"]
    print(f"{result['device']}: ResNet-18 (width {args.width}) batch {args.batch}"
          f"{' compiled' if args.compile else ''}: hand {result['hand_ms']:.2f} ms/step, "
          f"loop {result['loop_ms']:.2f} ms/step, loop/hand = {result['ratio']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
