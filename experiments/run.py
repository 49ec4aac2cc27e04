"""Run every arm of a study for several seeds and write its result table.

    python experiments/run.py pruning --size cpu --seeds 0 1 2 --out runs/experiments

A study is `experiments/<study>/study.yaml`: the model, one overlay per size (`cpu`: digits;
`cpu_fmnist`: a 10,000-image class-balanced subset of Fashion-MNIST at 28x28 and the whole
test split, sized for two CPU cores; `gpu`: all of Fashion-MNIST at 32x32) and the arms.
Each arm is a spec file of that folder (a valid fxgrow spec at the CPU size) plus optional
`set` (dotted-path values, e.g. `passes.0.final_sparsity: 0.95`) and its own per-size
overlay, applied in that order, the more specific last: study size, `set`, arm size.
Overlays are deep-merged; under `passes` they are keyed by pass kind and merged into every
pass of that kind. A `null` value removes the key (e.g. `train.epochs: null` next to
`train.steps`).

Each run goes through `fxgrow.api.run` into `<out>/<study>/<size>/<arm>/seed<k>/`; the table
(mean +- std of test accuracy over seeds, plus the study's columns) is written to
`<out>/<study>_<size>.md` and `.json`.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/run.py` puts experiments/ first, not the repo
    sys.path.insert(0, str(ROOT))

from fxgrow.api import run as run_spec  # noqa: E402
from fxgrow.specs.root import parse_spec  # noqa: E402

STUDIES = ("pruning", "growth", "compander", "sorted", "sorted_lm")
HERE = Path(__file__).resolve().parent


# --- building the arms' specs --------------------------------------------------------

def deep_merge(base: Any, overlay: Any) -> Any:
    """`overlay` into `base` (dicts recursively; anything else replaces). A `passes`
    overlay is a {kind: fields} dict merged into every pass of that kind."""
    if not isinstance(base, dict) or not isinstance(overlay, dict):
        return copy.deepcopy(overlay)
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if value is None:
            out.pop(key, None)
        elif key == "passes" and isinstance(out.get(key), list):
            out[key] = [deep_merge(p, value[p["kind"]]) if p.get("kind") in value else p for p in out[key]]
        else:
            out[key] = deep_merge(out.get(key), value) if key in out else copy.deepcopy(value)
    return out


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value


def substitute(value: Any, mapping: dict[str, str]) -> Any:
    """`$run:<arm>` strings become that arm's run folder (same seed)."""
    if isinstance(value, str) and value.startswith("$run:"):
        return mapping[value[len("$run:"):]]
    if isinstance(value, list):
        return [substitute(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, mapping) for k, v in value.items()}
    return value


def load_study(name: str) -> dict[str, Any]:
    path = HERE / name / "study.yaml"
    if not path.is_file():
        raise SystemExit(f"unknown study {name!r}: no {path} (studies: {', '.join(STUDIES)})")
    return yaml.safe_load(path.read_text())


def arm_spec(study: dict[str, Any], arm: dict[str, Any], size: str, seed: int,
             runs: dict[str, str], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = yaml.safe_load((HERE / study["study"] / arm["spec"]).read_text())
    # from the general to the specific: the study's size, the arm, the arm at this size
    spec = deep_merge(spec, study.get("sizes", {}).get(size, {}))
    for dotted, value in arm.get("set", {}).items():
        set_path(spec, dotted, value)
    spec = deep_merge(spec, arm.get("sizes", {}).get(size, {}))
    spec = deep_merge(spec, overrides or {})
    spec = substitute(spec, runs)
    spec["name"] = f"{study['study']}_{arm['name']}_{size}"
    train = spec.setdefault("train", {})
    train["seed"] = seed + arm.get("seed_offset", 0)
    train.setdefault("progress", "none")
    return spec


# --- running ---------------------------------------------------------------------------

def run_study(name: str, size: str, seeds: list[int], out: Path, overrides: dict[str, Any] | None = None,
              arms: list[str] | None = None, dry_run: bool = False, reuse: bool = False) -> dict[str, Any]:
    study = load_study(name)
    if size not in study.get("sizes", {}):
        raise SystemExit(f"study {name!r} has no size {size!r} (sizes: {', '.join(study.get('sizes', {}))})")
    selected = [a for a in study["arms"] if not arms or a["name"] in arms or a.get("helper")]
    model = str(ROOT / study["model"])
    results: dict[str, list[dict[str, Any]]] = {a["name"]: [] for a in selected}
    for seed in seeds:
        runs: dict[str, str] = {}
        for arm in selected:
            run_dir = out / name / size / arm["name"] / f"seed{seed}"
            runs[arm["name"]] = str(run_dir)
            raw = arm_spec(study, arm, size, seed, runs, overrides)
            inputs = [Path(p) for p in strings(raw) & set(runs.values()) if p != str(run_dir)]  # e.g. fused nets
            spec = parse_spec(raw, source=f"{name}/{arm['name']} ({size})")
            if dry_run:
                print(f"{name} {size} seed {seed}: {arm['name']} ok")
                continue
            report = finished_run(run_dir, spec, inputs) if reuse else None
            if report is None:
                report = run_spec(spec, model, out_dir=run_dir, overwrite=True)  # not reusable: run it again
            print(f"{name} {size} seed {seed} {arm['name']}: accuracy {report['accuracy']:.4f} "
                  f"({report['wall_time_s']:.1f} s)", flush=True)
            results[arm["name"]].append(report)
    if dry_run:
        return {}
    table = TABLES[study.get("table", "arms")](study, selected, results)
    record = {"study": name, "size": size, "seeds": seeds,
              "command": command_line(name, size, seeds, out, reuse, arms, overrides),
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "columns": table["columns"], "rows": table["rows"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_{size}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{name}_{size}.md").write_text(markdown(record))
    return record


def strings(value: Any) -> set[str]:
    """Every string anywhere in a spec (the run folders it names among them)."""
    if isinstance(value, str):
        return {value}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return set().union(*map(strings, items))


def finished_run(run_dir: Path, spec, inputs: list[Path] = ()) -> dict[str, Any] | None:
    """The report of a finished run of exactly this spec in `run_dir`, else None; also None
    when a run it reads (`inputs`) finished after it, so it was built from an older one."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
        saved = parse_spec(yaml.safe_load((run_dir / "spec.yaml").read_text()))
        finished = (run_dir / "report.json").stat().st_mtime
        if any((p / "report.json").stat().st_mtime > finished for p in inputs):
            return None
    except (OSError, ValueError):
        return None
    def comparable(s):
        return s.model_dump(mode="json", exclude={"model": {"entry"}})
    if comparable(saved) != comparable(spec):
        return None
    return report


def command_line(name: str, size: str, seeds: list[int], out: Path, reuse: bool = False,
                 arms: list[str] | None = None, overrides: dict[str, Any] | None = None) -> str:
    """The command that reproduces the table, every option that shaped it included."""
    parts = ["python experiments/run.py", name, "--size", size, "--seeds", *map(str, seeds), "--out", str(out)]
    if arms:
        parts += ["--arms", *arms]
    if overrides:
        parts += ["--set", shlex.quote(yaml.safe_dump(overrides, default_flow_style=True).strip())]
    return " ".join(parts + (["--reuse"] if reuse else []))


def machine() -> str:
    import platform

    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.machine()}"
    return f"{device}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"


# --- tables ----------------------------------------------------------------------------

def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def arm_rows(study, arms, results):
    """One row per arm: accuracy, Δ vs the arm's baseline, parameters, the loop's wall time, and the
    study's extra columns (`columns:` in study.yaml, each a path into report.json)."""
    extra = study.get("columns", {})
    reference = study.get("flops_reference")
    ref_flops = mean([train_flops(r) for r in results.get(reference, [])]) if reference else None
    columns = ["arm", "accuracy %", "Δ vs baseline (points)", "params", *extra, "train s"]
    if reference:
        columns[-1:-1] = ["flops_norm", "flops_norm_all"]
    rows = []
    for arm in arms:
        if arm.get("helper"):
            continue
        reports = results[arm["name"]]
        accs = [r["accuracy"] for r in reports]
        row: dict[str, Any] = {"arm": arm["name"], "accuracy %": mean_std(accs), "accuracy": accs}
        base = arm.get("baseline")
        row["Δ vs baseline (points)"] = (f"{100 * (mean(accs) - mean([r['accuracy'] for r in results[base]])):+.2f}"
                                         if base and results.get(base) and accs else "")
        row["params"] = reports[0]["parameters"] if reports else None
        for column, path in extra.items():
            values = [v for v in (dig(r, path) for r in reports) if v is not None]
            row[column] = format_value(values)
        if reference:
            for column, which in (("flops_norm", "counted"), ("flops_norm_all", "all")):
                spent = [train_flops(r, which) for r in reports]
                row[column] = f"{mean(spent) / ref_flops:.3f}" if ref_flops and None not in spent else ""
        row["train s"] = f"{mean([r['wall_time_s'] for r in reports]):.1f}" if reports else ""
        rows.append(row)
    return {"columns": columns, "rows": rows}


def sorted_rows(study, arms, results):
    """One row per grid point of the sorted arm: accuracy over seeds, share of the largest,
    and the accuracy of the same shape trained alone where an arm has that `shape`."""
    sorted_arm = next(a["name"] for a in arms if a.get("sorted"))
    alone = {(a["shape"]["width"], a["shape"]["depth"]): a["name"] for a in arms if "shape" in a}
    points: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for report in results[sorted_arm]:
        for point in report["sorted_slicing"]["grid"]:
            points.setdefault((point["width"], point.get("depth")), []).append(point)
    columns = ["width", "depth", "params", "FLOPs", "accuracy % (sorted)", "share of largest %",
               "accuracy % (trained alone)", "alone arm"]
    rows = []
    for (width, depth), pts in sorted(points.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        name = alone.get((width, depth))
        rows.append({"width": width, "depth": depth, "params": pts[0]["params"], "FLOPs": pts[0]["flops"],
                     "accuracy % (sorted)": mean_std([p["accuracy"] for p in pts]),
                     "accuracy": [p["accuracy"] for p in pts],
                     "share of largest %": mean_std([p["share"] for p in pts], digits=1),
                     "accuracy % (trained alone)": mean_std([r["accuracy"] for r in results[name]]) if name else "",
                     "alone arm": name or "",
                     "alone params": results[name][0]["parameters"] if name and results[name] else None})
    return {"columns": columns, "rows": rows}


def sorted_lm_rows(study, arms, results):
    """One row per shape (depth in layers, FFN fraction, heads fraction; a dimension a sorted
    arm does not slice is whole, 1.0): held-out perplexity of that shape trained alone and
    of each sorted arm's sub-model. A grid point is read by its `ffn` (or `width`, where the
    pass has one width dimension) and `heads` fractions and its depth divided by the sorted
    arm's `blocks_per_layer` (1 when the pass counts layers). A ratio is given only where the
    sub-model has the alone model's parameter count: otherwise the cell says the shapes
    differ instead of comparing them."""
    def shape_key(depth, found):
        return depth, found.get("ffn", found.get("width", 1.0)), found.get("heads", 1.0)

    shapes = {shape_key(a["shape"]["depth"], a["shape"]): a["name"] for a in arms if "shape" in a}
    sorted_arms = [a for a in arms if a.get("sorted")]
    points: dict[str, dict[tuple, list[dict[str, Any]]]] = {}
    for arm in sorted_arms:
        per_layer, found = arm.get("blocks_per_layer", 1), points.setdefault(arm["name"], {})
        for report in results.get(arm["name"], []):
            for point in report["sorted_slicing"]["grid"]:
                depth = point.get("depth")
                found.setdefault(shape_key(depth // per_layer if depth is not None else None, point), []).append(point)
    columns = ["depth", "ffn", "heads", "params (alone)", "perplexity (trained alone)"]
    for arm in sorted_arms:
        columns += [f"params ({arm['name']})", f"perplexity ({arm['name']})", f"{arm['name']} / alone"]
    keys = set(shapes).union(*(set(found) for found in points.values()))
    rows = []
    for key in sorted(keys, key=lambda k: (k[0] or 0, k[1], k[2])):
        name = shapes.get(key)
        alone = [r["perplexity"] for r in results.get(name, [])] if name else []
        params = results[name][0]["parameters"] if alone else None
        row: dict[str, Any] = {"depth": key[0], "ffn": key[1], "heads": key[2], "params (alone)": params,
                               "perplexity (trained alone)": mean_std(alone, scale=1.0) if alone else "",
                               "perplexity alone": alone, "alone arm": name or ""}
        for arm in sorted_arms:
            pts = points[arm["name"]].get(key, [])
            subs = [p["perplexity"] for p in pts if "perplexity" in p]
            sub_params = pts[0].get("params") if pts else None
            ratio = ""
            if subs and alone:
                ratio = (f"{mean(subs) / mean(alone):.3f}" if params == sub_params
                         else f"not the same shape ({sub_params} vs {params} params)")
            row.update({f"params ({arm['name']})": sub_params if sub_params is not None else "",
                        f"perplexity ({arm['name']})": mean_std(subs, scale=1.0) if subs else "",
                        f"perplexity {arm['name']}": subs, f"{arm['name']} / alone": ratio})
        rows.append(row)
    return {"columns": columns, "rows": rows}


TABLES = {"arms": arm_rows, "sorted": sorted_rows, "sorted_lm": sorted_lm_rows}


def dig(report: dict[str, Any], path: str) -> Any:
    node: Any = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def format_value(values: list[Any]) -> str:
    if not values:
        return ""
    if all(isinstance(v, int) for v in values):
        return f"{statistics.mean(values):.0f}"
    if all(isinstance(v, (int, float)) for v in values):
        m = statistics.mean(values)
        return f"{m:.4f}" if abs(m) < 10 else f"{m:.0f}"
    return str(values[0])


def train_flops(report: dict[str, Any], which: str = "counted") -> float | None:
    """Training FLOPs as MixtureGrowth counts them (`counted`: the fused runs and this run after
    growth; a run that never grew, all of it), or every small net's too (`all`)."""
    section = report.get("template_mixing")
    if not section or "train_flops" not in section:
        return None
    key = "counted_train_flops" if which == "counted" else "all_nets_train_flops"
    if key in section:
        return section[key]
    return section["train_flops"] + sum(f or 0.0 for f in section.get("fused_train_flops", []))  # before issue 16


def markdown(record: dict[str, Any]) -> str:
    cols = record["columns"]
    lines = [f"`{record['command']}`  ", f"{record['machine']}, {record['date']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in record["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=STUDIES)
    parser.add_argument("--size", default="cpu", help="a size of the study's `sizes` (cpu, cpu_fmnist, gpu)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--arms", nargs="+", help="run only these arms (and the helper runs they need)")
    parser.add_argument("--set", dest="overrides", default=None,
                        help="YAML mapping deep-merged into every arm's spec last, e.g. '{train: {steps: 5}}'")
    parser.add_argument("--reuse", action="store_true",
                        help="take the report of a finished run of the same spec instead of training again")
    parser.add_argument("--dry-run", action="store_true", help="build and validate every spec, train nothing")
    args = parser.parse_args(argv)
    overrides = yaml.safe_load(args.overrides) if args.overrides else None
    record = run_study(args.study, args.size, args.seeds, args.out, overrides, args.arms, args.dry_run, args.reuse)
    if record:
        print(markdown(record))


if __name__ == "__main__":
    main()
