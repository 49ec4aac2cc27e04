"""Shared step-time measurement for the bench/ scripts.

A "step" is forward + backward + optimizer step on one fixed batch (so data loading is
not measured). Timings are medians over `steps` after `warmup`, with CUDA events on a GPU
and perf_counter on the CPU. Ratios are only meaningful inside one process on one device,
so variants are timed in interleaved rounds (`interleaved`): drift hits all of them alike.

A script's command line comes from `bench_parser` + `bench_setup`:

    ap = bench_parser(__doc__, full_batch=512)
    args = ap.parse_args()
    run = bench_setup(args)                      # device, batch, width, steps, warmup, compile modes
    steps = {name: train_step_fn(*prepared(model, x), y) for name, model in models.items()}
    timings = interleaved(steps, run.device, args.rounds, run.steps, run.warmup)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Timing:
    name: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    steps: int
    peak_mem_mb: float | None = None  # CUDA: the most a step allocated above what was resident before it


@dataclass
class BenchRun:
    device: torch.device
    batch: int
    width: int
    steps: int
    warmup: int
    compile_modes: list[bool]  # [False] or [False, True]: eager, then compiled


def bench_parser(doc: str, *, full_batch: int = 512, small_batch: int = 16, compile_default: str = "yes"
                 ) -> argparse.ArgumentParser:
    """The options every bench script shares; a script adds its own to the returned parser."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help=f"width 16, batch {small_batch}, few steps: for a CPU")
    ap.add_argument("--batch", type=int, help=f"default {full_batch} ({small_batch} with --small)")
    ap.add_argument("--width", type=int, help="ResNet base width, default 64 (16 with --small)")
    ap.add_argument("--steps", type=int, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", choices=["auto", "yes", "no"], default=compile_default,
                    help="also time torch.compile'd variants (auto: on CUDA only)")
    ap.add_argument("--no-compile", dest="compile", action="store_const", const="no", help="same as --compile no")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a shared CPU stalls with more)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.set_defaults(full_batch=full_batch, small_batch=small_batch)
    return ap


def bench_setup(args: argparse.Namespace) -> BenchRun:
    """Device (CUDA unless --small or none), sizes filled from --small, CPU threads, seed 0."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    compiled = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    return BenchRun(device=device,
                    batch=args.batch or (args.small_batch if args.small else args.full_batch),
                    width=args.width or (16 if args.small else 64),
                    steps=args.steps or (5 if args.small else 20),
                    warmup=args.warmup or (2 if args.small else 10),
                    compile_modes=[False, True] if compiled else [False])


def allow_recompiles(count: int = 64) -> None:
    """Let dynamo keep `count` graphs per code object (one per sub-model of a sliced model);
    the option was named cache_size_limit before torch 2.6."""
    import torch._dynamo.config as config
    setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit", count)


def suffix(compiled: bool) -> str:
    return " (compiled)" if compiled else ""


def resnet_cifar(width: int = 64, depth: int = 18) -> nn.Module:
    """The CIFAR-shaped ResNet of examples/models/resnet_cifar.py (every script's model)."""
    from fxgrow.loader import load_model
    return load_model(str(ROOT / "examples/models/resnet_cifar.py"), {"width": width, "depth": depth})


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def setting(device: torch.device) -> str:
    return f"{device_name(device)}, torch {torch.__version__}" + (
        ", bf16 autocast, channels_last" if device.type == "cuda" else "")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, steps: int = 30,
               warmup: int = 10) -> list[float]:
    """Milliseconds per call of `step`, one sample per call, after warm-up."""
    for _ in range(warmup):
        step()
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
    else:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def summarize(name: str, samples: list[float], peak_mem_mb: float | None = None) -> Timing:
    qs = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return Timing(name, statistics.median(samples), qs[0], qs[-1], len(samples), peak_mem_mb)


def interleaved(steps_by_name: dict[str, Callable[[], None]], device: torch.device, rounds: int,
                steps: int, warmup: int) -> dict[str, Timing]:
    """Each round times every variant in turn (`warmup` then `steps` steps), so slow drift of
    the machine (clocks, other users) hits all variants alike; the median is over all rounds'
    samples. On CUDA each variant's peak is the most one of its steps allocated above what was
    resident when its steps began (the other variants' models and grads are resident too)."""
    samples: dict[str, list[float]] = {name: [] for name in steps_by_name}
    peaks: dict[str, float] = {}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            samples[name] += time_steps(step, device, steps, warmup)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
                peaks[name] = max(peaks.get(name, 0.0), peak)
    return {name: summarize(name, s, peaks.get(name)) for name, s in samples.items()}


def prepared(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The model in train mode on x's device; channels_last model and images on CUDA."""
    model = model.to(x.device).train()
    if x.device.type == "cuda" and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.01,
                  amp: bool = True, *, callbacks: Iterable = (), compile: bool = False,
                  weight_decay: float = 0.0) -> Callable[[], None]:
    """One SGD step (momentum 0.9) on a fixed batch, bf16 autocast on CUDA. `callbacks`
    (the passes' training callbacks) get their parameter-group overrides, on_train_start and
    their after_backward/after_step hooks as the loop runs them; `compile` compiles the forward."""
    from fxgrow.specs.train import SGDSpec
    from fxgrow.train.optim import build_optimizer, merge_overrides

    callbacks = list(callbacks)
    overrides = merge_overrides(model, ((cb.name, cb.param_group_overrides(model)) for cb in callbacks))
    opt = build_optimizer(model, SGDSpec(lr=lr, momentum=0.9, weight_decay=weight_decay), overrides)
    ctx = SimpleNamespace(model=model, optimizer=opt, step=0, log=lambda record: None)
    for cb in callbacks:  # the compander hooks the optimizer's steps here
        cb.on_train_start(ctx)
    forward = torch.compile(model) if compile else model
    loss_fn = nn.CrossEntropyLoss()
    use_amp = amp and x.device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(forward(x), y)
        loss.backward()
        for cb in callbacks:
            cb.after_backward(ctx)
        opt.step()
        ctx.step += 1
        for cb in callbacks:
            cb.after_step(ctx)
    return step


def measure(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, compile: bool = False,
            steps: int = 30, warmup: int = 10) -> Timing:
    """One variant alone (use `interleaved` to compare variants)."""
    model, x = prepared(model, x)
    return interleaved({name: train_step_fn(model, x, y, compile=compile)}, x.device, 1, steps, warmup)[name]


def table(timings: list[Timing], baseline: str) -> str:
    """Markdown table of medians and ratios to `baseline`."""
    base = {t.name: t for t in timings}[baseline].median_ms
    rows = ["| variant | median ms | p10 | p90 | ratio vs " + baseline + " |", "|---|---|---|---|---|"]
    for t in timings:
        rows.append(f"| {t.name} | {t.median_ms:.2f} | {t.p10_ms:.2f} | {t.p90_ms:.2f} | "
                    f"{t.median_ms / base:.3f} |")
    return "\n".join(rows)


def print_modes(timings: dict[str, Timing], compiled: bool, baseline: str = "plain") -> None:
    """The table of one mode's variants (names ending in suffix(compiled))."""
    chosen = [t for t in timings.values() if t.name.endswith(suffix(compiled)) and (compiled or "(" not in t.name)]
    print(f"\n{'compiled' if compiled else 'eager'}:")
    print(table(chosen, baseline + suffix(compiled)))


def time_modes(run: BenchRun, rounds: int, make_steps: Callable[[bool], dict[str, Callable[[], None]]]
               ) -> dict[str, Timing]:
    """Eager then (if asked) compiled: `make_steps(compiled)` gives the named steps of one
    mode (names ending in suffix(compiled)); each mode is timed interleaved and printed."""
    timings: dict[str, Timing] = {}
    for compiled in run.compile_modes:
        timings |= interleaved(make_steps(compiled), run.device, rounds, run.steps, run.warmup)
        print_modes(timings, compiled)
    return timings


def dump(path: str, timings: list[Timing], device: torch.device, **extra) -> None:
    with open(path, "w") as f:
        json.dump({"device": device_name(device), "torch": torch.__version__,
                   "timings": [asdict(t) for t in timings], **extra}, f, indent=2)
