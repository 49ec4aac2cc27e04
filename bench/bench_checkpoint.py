"""What issue 15's run-folder safety costs at checkpoint time, against one training step.

    python bench/bench_checkpoint.py [--width 64] [--batch 128] [--repeats 5]

On the CIFAR ResNet-18 (width 64: 11.2M parameters) with SGD momentum state, medians over
the repeats of: one training step (forward + backward + SGD step, batch 128, 32x32); the
finiteness check the Trainer runs when a checkpoint is due (one flag per parameter,
buffer and optimizer state tensor, one sync); the checksums save_checkpoint records; the
whole save (checksums + torch.save + fsync + rename) against a bare torch.save; and the
verified load against a bare torch.load. Nothing here runs per step: the training step
itself is unchanged.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import device_name, resnet_cifar
from fxgrow.train.checkpoint import checksums, finite_flags, load_checkpoint, save_checkpoint


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet_cifar(args.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step_ms = median_ms(step, args.repeats)
    tensors = [t for t in [*model.parameters(), *model.buffers(),
                           *(v for s in optimizer.state.values() for v in s.values())] if t.is_floating_point()]
    finite_ms = median_ms(lambda: bool(finite_flags(tensors).all()), args.repeats)
    state = {"step": 1, "spec": {}, "train_spec": {}, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": {}, "rng": [], "callbacks": {}, "interval_sums": [0.0, 0.0, 0.0], "wall_time_s": 0.0}
    sums_ms = median_ms(lambda: checksums(state), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path, bare = Path(tmp) / "checkpoint.pt", Path(tmp) / "bare.pt"
        save_ms = median_ms(lambda: save_checkpoint(path, state), args.repeats)
        bare_save_ms = median_ms(lambda: torch.save(state, bare), args.repeats)
        load_ms = median_ms(lambda: load_checkpoint(path), args.repeats)
        bare_load_ms = median_ms(lambda: torch.load(bare, weights_only=True), args.repeats)
        size_mb = path.stat().st_size / 1e6
    params = sum(p.numel() for p in model.parameters())
    print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}; ResNet-18 width {args.width} "
          f"({params / 1e6:.1f}M parameters), batch {args.batch}, checkpoint {size_mb:.0f} MB")
    rows = [("training step", step_ms), ("finiteness check (checkpoint time)", finite_ms),
            ("checksums (checkpoint time)", sums_ms), ("save_checkpoint (checksums, fsync, rename)", save_ms),
            ("bare torch.save", bare_save_ms), ("load_checkpoint (verified)", load_ms),
            ("bare torch.load(weights_only=True)", bare_load_ms)]
    for name, ms in rows:
        print(f"  {name:<44} {ms:9.1f} ms   {ms / step_ms:6.2f} steps")


if __name__ == "__main__":
    main()
