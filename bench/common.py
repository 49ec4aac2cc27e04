"""Shared step-time measurement for the bench/ scripts.

A "step" is forward + backward + optimizer step on one fixed batch (so data loading is
not measured). Timings are medians over `steps` after `warmup`, with CUDA events on a GPU
and perf_counter on the CPU. Ratios are only meaningful inside one process on one device.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Timing:
    name: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    steps: int
    peak_mem_mb: float | None = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.01,
                  amp: bool = True) -> Callable[[], None]:
    """One SGD training step on a fixed batch, bf16 autocast on CUDA."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    use_amp = amp and x.device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return step


def measure(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, compile: bool = False,
            steps: int = 30, warmup: int = 10) -> Timing:
    model = model.to(x.device).train()
    if x.device.type == "cuda" and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    runnable = torch.compile(model) if compile else model
    if x.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(x.device)
    samples = time_steps(train_step_fn(runnable, x, y), x.device, steps, warmup)
    qs = statistics.quantiles(samples, n=10)
    peak = torch.cuda.max_memory_allocated(x.device) / 2**20 if x.device.type == "cuda" else None
    return Timing(name, statistics.median(samples), qs[0], qs[-1], steps, peak)


def table(timings: list[Timing], baseline: str) -> str:
    """Markdown table of medians and ratios to `baseline`."""
    base = {t.name: t for t in timings}[baseline].median_ms
    rows = ["| variant | median ms | p10 | p90 | ratio vs " + baseline + " |", "|---|---|---|---|---|"]
    for t in timings:
        rows.append(f"| {t.name} | {t.median_ms:.2f} | {t.p10_ms:.2f} | {t.p90_ms:.2f} | "
                    f"{t.median_ms / base:.3f} |")
    return "\n".join(rows)


def dump(path: str, timings: list[Timing], device: torch.device, **extra) -> None:
    with open(path, "w") as f:
        json.dump({"device": device_name(device), "torch": torch.__version__,
                   "timings": [asdict(t) for t in timings], **extra}, f, indent=2)
