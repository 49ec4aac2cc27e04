"""One command, one process: the step-time cost of every fxgrow pass against its goal.

    python bench/harness.py                       # CUDA: ResNet-18 batch 512 + transformer, bf16, eager + compiled
    python bench/harness.py --small               # CPU smoke run: narrow models, few steps (a few minutes)
    python bench/harness.py --out bench/results   # where harness.json and harness.md go (the default)

For a CIFAR-shaped ResNet-18 (examples/models/resnet_cifar.py, batch 512) and a ViT-style
transformer on 4x4 CIFAR patches (bench/transformer.py, 64 tokens, batch 512), in eager and
torch.compile mode, a training step (forward + backward + SGD with momentum, bf16 autocast
and channels_last on CUDA; bench/common.py) of:
- plain: the user's model;
- template_mixing, compander (with its per-step weight-decay correction), masks
  (prune_regrow at a fixed 90% sparsity: the masks' steady-state cost; events are
  bench_prune.py's), sorted_slicing (running its largest sub-model): each pass alone;
- all four: the four passes stacked in one pipeline, running the largest sub-model;
- parametrize (compander | masks | mixing): the same math through torch.nn.utils.parametrize;
- sub-models: the half-width and half-depth sub-models run through the sliced model vs the
  same sub-models extracted as standalone plain models;
and, for inference (eval, no grad), the all-four model folded back to plain modules vs the
plain model; and trace + analyses + the four-pass rewrite of torchvision's resnet50.
Variants are timed in interleaved rounds (drift hits all alike); medians of rounds x steps
(>= 30) samples after warm-up. Ratios are against the row's reference in the same process.
The eager groups and the trace run first; the compiled groups share what is left of
--budget-s (510 s), compiling variants in VARIANT_ORDER and leaving out (and naming) those
not compiled in their share, so the command ends in under 10 minutes.
"""
from __future__ import annotations

import datetime
import json
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import bench_compander, bench_mixing, bench_prune, bench_slicing, bench_trace  # noqa: E402
from bench.common import (Timing, allow_recompiles, bench_parser, bench_setup, device_name,  # noqa: E402
                          interleaved, prepared, resnet_cifar, suffix, train_step_fn)
from bench.transformer import build as transformer  # noqa: E402
from fxgrow.fold import fold  # noqa: E402
from fxgrow.passes import Pipeline  # noqa: E402
from fxgrow.passes.compander import CompanderPass  # noqa: E402
from fxgrow.passes.prune_regrow import PruneRegrowPass  # noqa: E402
from fxgrow.passes.prune_regrow_masks import masked_weights  # noqa: E402
from fxgrow.passes.template_mixing import TemplateMixingPass  # noqa: E402
from fxgrow.subnets import find_state  # noqa: E402

SPARSITY = 0.9
WEIGHT_DECAY = 5e-4  # every variant's SGD; the compander corrects it to act on the effective weights
# (row, variant, reference, goal eager, goal compiled); None: reported, no goal.
ROWS = (
    ("template_mixing", "template_mixing", "plain", 1.10, 1.05),
    ("compander", "compander", "plain", 1.05, 1.02),
    ("masks", "masks", "plain", 1.05, None),
    ("sorted_slicing (full width)", "sorted_slicing", "plain", 1.05, 1.05),
    ("all four stacked", "all four", "plain", 1.15, 1.10),
    ("parametrize: mixing", "parametrize mixing", "plain", None, None),
    ("parametrize: compander", "parametrize compander", "plain", None, None),
    ("parametrize: masks", "parametrize masks", "plain", None, None),
    ("half-width sub-model", "sliced w0.5", "extracted w0.5", 1.10, 1.10),
    ("half-depth sub-model", "sliced d/2", "extracted d/2", 1.10, 1.10),
    ("folded all four (inference)", "folded", "plain", 1.01, 1.01),
)
# Compiled, variants compile in this order (the rows with goals first), so a group cut short by
# --budget-s loses the least informative ones.
# "folded" (a forward-only compile) comes early: it is cheap and has a goal.
VARIANT_ORDER = ("plain", "all four", "folded", "compander", "template_mixing", "masks", "sorted_slicing",
                 "sliced w0.5", "extracted w0.5", "sliced d/2", "extracted d/2", "parametrize compander",
                 "parametrize mixing", "parametrize masks")
# On a CPU (--small) only the transformer compiles, only these (inductor's C++ builds are slow).
CPU_COMPILED = {"transformer": ("plain", "all four", "folded")}


@dataclass
class Bench:
    """One model: how to build it, its batch, and the variants to time."""
    name: str
    build: Callable[[], torch.nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    about: str
    variants: dict[str, tuple[torch.nn.Module, list, tuple | None]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def benches(run, small: bool) -> list[Bench]:
    device, batch = run.device, run.batch
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    patches = torch.randn(batch, 64, 48, generator=g).to(device)  # 32x32x3 images as 64 patches of 4x4x3
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    size = dict(dim=32, depth=2, heads=2) if small else dict(dim=256, depth=6, heads=4)
    return [
        Bench("resnet18", lambda: resnet_cifar(run.width), images, labels,
              f"CIFAR ResNet-18 width {run.width}, batch {batch}, 3x32x32"),
        Bench("transformer", lambda: transformer(**size), patches, labels,
              f"transformer dim {size['dim']}, depth {size['depth']}, heads {size['heads']}, MLP x4, "
              f"batch {batch}, 64 tokens of 48"),
    ]


def _attempt(bench: Bench, names: tuple[str, ...], make: Callable[[], dict]) -> None:
    """Add the variants `make` builds; a failure is recorded against each name, not raised."""
    try:
        bench.variants |= make()
    except Exception as e:  # noqa: BLE001 - one broken variant must not hide the others' figures
        traceback.print_exc()
        for name in names:
            bench.errors[name] = f"{type(e).__name__}: {e}"


def build_variants(bench: Bench) -> None:
    build, example = bench.build, bench.x[:2].cpu()
    v = bench.variants
    v["plain"] = (build(), [], None)
    mixed: dict = {}

    def mixing():
        mixed["gm"] = TemplateMixingPass()(build(), example).graph_module
        return {"template_mixing": (mixed["gm"], [], None),
                "parametrize mixing": (bench_mixing.with_parametrize(build(), mixed["gm"]), [], None)}

    def compander():
        result = CompanderPass()(build())
        return {"compander": (result.graph_module, result.callbacks, None),
                "parametrize compander": (bench_compander.with_parametrize(build()), [], None)}

    def masks():
        gm = PruneRegrowPass(**bench_prune.masks_spec(SPARSITY))(build()).graph_module
        found = {w.key: w.mask for w in masked_weights(gm)}
        return {"masks": (gm, [], None), "parametrize masks": (bench_prune.with_parametrize(build(), found), [], None)}

    def slicing():
        out = {}
        for name, (model, point) in bench_slicing.variants(build, bench.x).items():
            if name != "plain":
                out[name.replace("sliced full", "sorted_slicing")] = (model, [], point)
        return out

    def stacked():
        slicer, _, _ = bench_slicing.grid_pass(build(), bench.x)
        result = Pipeline([TemplateMixingPass(), CompanderPass(), PruneRegrowPass(**bench_prune.masks_spec(SPARSITY)),
                           slicer])(build(), example_input=example)
        gm = result.graph_module
        largest = max(find_state(gm).points)
        # The compander's weight-decay correction runs every step; the masks' and slicing's
        # callbacks act at events / pick sub-models, which the bench does itself.
        callbacks = [cb for cb in result.callbacks if cb.name == "compander"]
        find_state(gm).activate(*largest)
        folded = fold(gm)  # inference model: every chain evaluated into plain weights
        return {"all four": (gm, callbacks, largest), "folded": (folded, [], None)}

    _attempt(bench, ("template_mixing", "parametrize mixing"), mixing)
    _attempt(bench, ("compander", "parametrize compander"), compander)
    _attempt(bench, ("masks", "parametrize masks"), masks)
    _attempt(bench, ("sorted_slicing", "sliced w0.5", "extracted w0.5", "sliced d/2", "extracted d/2"), slicing)
    _attempt(bench, ("all four", "folded"), stacked)


def train_step(model, callbacks, point, x, y, compiled: bool) -> Callable[[], None]:
    model, x = prepared(model, x)
    state = find_state(model) if point is not None else None
    inner = train_step_fn(model, x, y, callbacks=callbacks, compile=compiled, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        if state is not None:
            state.activate(*point)  # as the slicing callback does before every step
        inner()
    return step


def inference_step(model, x, compiled: bool) -> Callable[[], None]:
    model, x = prepared(model, x)
    model.eval()
    forward = torch.compile(model) if compiled else model
    use_amp = x.device.type == "cuda"

    def step() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            forward(x)
    return step


def time_bench(bench: Bench, compiled: bool, only: tuple[str, ...] | None, rounds: int, steps: int,
               warmup: int, compile_until: float | None = None) -> tuple[dict[str, Timing], list[str]]:
    """Timings of the bench's variants in one mode, and the variants left out. Compiled, each
    variant is first run once on its own (compiling it) in the order of VARIANT_ORDER; one not
    yet compiled at `compile_until` (perf_counter seconds) is left out, so the group ends in time."""
    names = [n for n in VARIANT_ORDER if n in bench.variants and (only is None or n in only)]
    train = {n: train_step(*bench.variants[n], bench.x, bench.y, compiled) for n in names if n != "folded"}
    infer = {}
    if "folded" in names:
        infer = {"plain": inference_step(bench.variants["plain"][0], bench.x, compiled),
                 "folded": inference_step(bench.variants["folded"][0], bench.x, compiled)}
    left_out = []
    if compiled:
        for name in names:
            if compile_until is not None and time.perf_counter() > compile_until:
                left_out.append(name)
                continue
            if name == "folded":
                infer["plain"](), infer["folded"]()
            else:
                train[name]()
        train = {n: f for n, f in train.items() if n not in left_out}
        infer = {} if "folded" in left_out else infer
    out = interleaved({n + suffix(compiled): f for n, f in train.items()}, bench.x.device, rounds, steps, warmup)
    if infer:
        timed = interleaved({n + suffix(compiled): f for n, f in infer.items()}, bench.x.device, rounds, steps, warmup)
        out |= {f"inference {k}": t for k, t in timed.items()}
    return out, left_out


def trace_and_rewrite(small: bool) -> dict[str, float]:
    """bench_trace's stages on torchvision resnet50, then the four passes stacked (median of 3)."""
    import torchvision

    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 64 if small else 224, 64 if small else 224)
    bench_trace.once(model, x)  # cold
    stages = [bench_trace.once(model, x) for _ in range(3)]
    out = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    rewrites = []
    for _ in range(1 if small else 3):
        slicer, _, _ = bench_slicing.grid_pass(model, x)  # finds the blocks: a rewrite of its own, not timed
        start = time.perf_counter()
        Pipeline([TemplateMixingPass(), CompanderPass(), PruneRegrowPass(**bench_prune.masks_spec(SPARSITY)),
                  slicer])(model, example_input=x)
        rewrites.append(time.perf_counter() - start)
    out["all four passes (trace + rewrite)"] = statistics.median(rewrites)
    out["input"] = x.shape[-1]
    return out


def rows_for(bench: Bench, timings: dict[str, Timing], compiled: bool, only: tuple[str, ...] | None) -> list[dict]:
    rows = []
    for label, variant, reference, goal_eager, goal_compiled in ROWS:
        if only is not None and variant not in only:
            continue
        goal = goal_compiled if compiled else goal_eager
        prefix = "inference " if variant == "folded" else ""
        a = timings.get(prefix + variant + suffix(compiled))
        b = timings.get(prefix + reference + suffix(compiled))
        row = {"model": bench.name, "mode": "compiled" if compiled else "eager", "row": label,
               "variant": variant, "reference": reference, "goal": goal}
        if a is None or b is None:
            row["status"] = bench.errors.get(variant) or bench.errors.get(reference) or "not timed (see skipped)"
            rows.append(row)
            continue
        ratio = a.median_ms / b.median_ms
        row |= {"ms": a.median_ms, "reference_ms": b.median_ms, "ratio": ratio, "peak_mem_mb": a.peak_mem_mb,
                "reference_peak_mem_mb": b.peak_mem_mb,
                "status": "reported" if goal is None else ("met" if ratio <= goal else "missed")}
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [f"# fxgrow bench harness: {result['device']}, torch {result['torch']}, {result['date']}", "",
             f"`{result['command']}` ({result['elapsed_s']:.0f} s). Step = forward + backward + SGD step "
             "(inference rows: eval forward, no grad); ratio = variant median / reference median.", ""]
    lines += [f"- {b}" for b in result["models"].values()] + [""]
    lines += ["| model | mode | row | variant ms | reference | ref ms | ratio | goal | | peak MB (var / ref) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        goal = f"<= {r['goal']:.2f}" if r["goal"] is not None else "-"
        if "ratio" not in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['row']} | | {r['reference']} | | | {goal} | "
                         f"{r['status'][:120]} | |")
            continue
        mem = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f} / {r['reference_peak_mem_mb']:.0f}"
        lines.append(f"| {r['model']} | {r['mode']} | {r['row']} | {r['ms']:.2f} | {r['reference']} | "
                     f"{r['reference_ms']:.2f} | {r['ratio']:.3f} | {goal} | {r['status']} | {mem} |")
    t = result.get("trace_resnet50")
    if t:
        lines += ["", f"Trace + rewrite on torchvision resnet50 (input 1x3x{t['input']}x{t['input']}, CPU side, "
                      "median seconds):", "", "| stage | s |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in t.items() if k != "input"]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def record(result: dict, bench: Bench, compiled: bool, timings: dict[str, Timing], only, seconds: float) -> None:
    group = f"{bench.name} {'compiled' if compiled else 'eager'}"
    print(f"{group}: timed in {seconds:.1f} s", flush=True)
    result["timings"][group] = {k: asdict(v) for k, v in timings.items()}
    result["rows"] += rows_for(bench, timings, compiled, only)


def main() -> None:
    ap = bench_parser(__doc__, full_batch=512, small_batch=16)
    ap.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for harness.json and harness.md")
    ap.add_argument("--models", default="resnet18,transformer", help="comma-separated: resnet18, transformer")
    ap.add_argument("--budget-s", type=float, default=510,
                    help="seconds for the whole run: the compiled groups share what the eager ones leave, and "
                         "a variant not compiled in its group's share is left out (named under the table)")
    ap.add_argument("--no-trace", action="store_true", help="skip the resnet50 trace + rewrite timing")
    args = ap.parse_args()
    if args.steps is None and not args.small:
        args.steps = 10  # x 3 rounds = 30 samples per variant
    run = bench_setup(args)
    allow_recompiles()  # one compiled graph per sub-model
    started = time.perf_counter()
    chosen = [b for b in benches(run, args.small) if b.name in args.models.split(",")]
    result = {"device": device_name(run.device), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "settings": {"batch": run.batch, "steps": run.steps, "warmup": run.warmup, "rounds": args.rounds,
                           "sparsity": SPARSITY, "weight_decay": WEIGHT_DECAY,
                           "bf16_channels_last": run.device.type == "cuda"},
              "models": {b.name: b.about for b in chosen}, "timings": {}, "rows": [], "skipped": [], "errors": {}}
    for bench in chosen:
        t = time.perf_counter()
        build_variants(bench)
        print(f"{bench.name}: variants built in {time.perf_counter() - t:.1f} s", flush=True)
        result["errors"][bench.name] = bench.errors
    # Eager groups and the trace first: they take a known, short time; the compiled groups
    # share what is left of --budget-s.
    eager_s = {}
    for bench in chosen:
        t = time.perf_counter()
        timings, _ = time_bench(bench, False, None, args.rounds, run.steps, run.warmup)
        eager_s[bench.name] = time.perf_counter() - t
        record(result, bench, False, timings, None, eager_s[bench.name])
    if not args.no_trace:
        t = time.perf_counter()
        try:
            result["trace_resnet50"] = trace_and_rewrite(args.small)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["errors"]["trace_resnet50"] = f"{type(e).__name__}: {e}"
        print(f"resnet50 trace + rewrite: {time.perf_counter() - t:.1f} s", flush=True)
    compiled_groups = [b for b in chosen if True in run.compile_modes
                       and (run.device.type == "cuda" or b.name in CPU_COMPILED)]
    for i, bench in enumerate(compiled_groups):
        t = time.perf_counter()
        group_end = t + (started + args.budget_s - t) / (len(compiled_groups) - i)
        only = CPU_COMPILED.get(bench.name) if run.device.type == "cpu" else None
        # leave time to time the compiled variants: about what the eager group took
        timings, left_out = time_bench(bench, True, only, args.rounds, run.steps, run.warmup,
                                       compile_until=group_end - 1.2 * eager_s[bench.name])
        record(result, bench, True, timings, only, time.perf_counter() - t)
        if left_out:
            result["skipped"].append(f"{bench.name} compiled: {', '.join(left_out)} (past --budget-s)")
    if True in run.compile_modes and run.device.type == "cpu":
        for bench in chosen:
            kept = ", ".join(CPU_COMPILED.get(bench.name, ())) or "no variant"
            result["skipped"].append(f"{bench.name} compiled: {kept} compiled on the CPU")
    result["elapsed_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "harness.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "harness.md").write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + text)
    print(f"wrote {args.out / 'harness.json'} and {args.out / 'harness.md'}")


if __name__ == "__main__":
    main()
