"""The `fxgrow` command: thin typer commands over the Python API."""
from __future__ import annotations

import functools
import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import FxgrowError
from .options import TRUST_CODE_HELP, output_file, write_text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fxgrow: declarative graph rewriting over torch.fx "
                       "(template mixing and growth, compander, prune/regrow, sorted slicing).")
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def handles_errors(fn: Callable) -> Callable:
    """Known errors print one clear message and exit with their code; --debug re-raises."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FxgrowError as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
    return wrapper


def command(*args, **kwargs) -> Callable:
    def deco(fn: Callable) -> Callable:
        return app.command(*args, **kwargs)(handles_errors(fn))
    return deco


@command()
def apply(
    spec: Path = typer.Argument(..., help="YAML spec."),
    model: Optional[str] = typer.Argument(None, help="file.py (with build() or model) or package.module:callable; "
                                                      "default: the spec's model.entry"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<name>-<time>, "
                                                                 "or the resumed run's)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Clear the run already in --out first "
                                                             "(without it, a non-empty --out is refused)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override train.seed (e.g. a second source net)."),
) -> None:
    """Rewrite MODEL as SPEC says, train it, fold it and save everything under --out."""
    from .. import api
    from ..specs.root import load_spec

    from ..specs.root import with_overrides

    s = load_spec(spec)
    if seed is not None:
        s = with_overrides(s, {"train.seed": seed}, "--seed")
    report = api.run(s, model, out_dir=out_dir, resume=resume, overwrite=overwrite)
    acc, ppl = report.get("accuracy"), report.get("perplexity")
    if isinstance(ppl, float):  # causal_lm: accuracy is next-token accuracy
        summary = f"done: test perplexity {ppl:.2f}, token accuracy {acc:.4f}"
    else:
        summary = f"done: test accuracy {acc:.4f}" if isinstance(acc, float) else "done"
    out.print(summary, f"-> {report.get('out_dir', out_dir or '')}", markup=False)


def _parse_shape(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        shape = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise FxgrowError(f"--input-shape: expected integers like 1,3,32,32 (got {text!r})") from None
    if not shape or min(shape) < 1:
        raise FxgrowError(f"--input-shape: expected positive integers (got {text!r})")
    return shape


@command()
def inspect(
    model: str = typer.Argument(..., help="file.py, package.module:callable, or a run directory "
                                           "(shows the trained model, grown or not)"),
    spec: Optional[Path] = typer.Argument(None, help="Spec whose passes to apply (optional)."),
    fmt: str = typer.Option("text", "--format", help="text | dot | svg"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File for dot/svg output."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what each pass would match; rewrite nothing."),
    nodes: bool = typer.Option(False, "--nodes", help="List every graph node."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,32,32."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Show the (rewritten) graph: weight chains, parameters and FLOPs, channel groups."""
    from .. import api
    from ..analysis import measure, propagate_shapes
    from ..inspection import chain_rows, node_rows, to_dot
    from ..specs.root import load_spec, parse_spec, with_overrides

    if fmt not in ("text", "dot", "svg"):
        raise FxgrowError(f"--format: expected text, dot or svg (got {fmt!r})")
    output_file(output, "--output")
    run_dir = Path(model)
    if run_dir.is_dir():
        if spec is not None or dry_run:
            raise FxgrowError("inspect RUN shows a trained run as it is: give no SPEC and no --dry-run")
        s, gm = api.restore(run_dir, trust_code=trust_code)
        user_model = api.build_model(s)
    else:
        s = load_spec(spec) if spec else parse_spec({})
    shape = _parse_shape(input_shape)
    if shape:  # the (first) example input's shape; dtype and id range kept
        example = s.model.with_example_shape(shape).model_dump(mode="json", exclude_unset=True)["example_input"]
        s = with_overrides(s, {"model.example_input": example}, "--input-shape")
    x = api.example_input(s)
    covered = None
    if not run_dir.is_dir():
        user_model = api.build_model(s, model).eval()
        plain = api.trace_model(s, user_model)
        if dry_run:  # every check the rewrite runs, on a copy
            result = api.pipeline(s).trial(plain, example_input=x, seed=s.train.seed)
            _print_matches(result.matches)
            _print_untouched(result.coverage())
            return
        result = api.compile_spec(s, plain) if s.passes else None
        gm = result.graph_module.eval() if result is not None else plain
        covered = result.coverage() if result is not None else None
    propagate_shapes(gm, x)
    if fmt != "text":
        _write_graph(to_dot(gm), fmt, output)
        return
    if nodes:
        out.print(_table("graph nodes", node_rows(gm)))
    rows = chain_rows(gm)
    if rows:
        out.print(_table("weight chains", rows))
    before, after = measure(user_model, x), measure(gm, x)
    out.print(_table("cost", [
        {"": "original", "params": f"{before.params:,}", "forward FLOPs": f"{before.flops:,}"},
        {"": "rewritten", "params": f"{after.params:,}", "forward FLOPs": f"{after.flops:,}"}]))
    _print_groups(gm)
    if covered:
        _print_untouched(covered)
    for section in _describers(gm, api.passes_from_spec(s)):
        out.print(section)


def _print_matches(matches: dict) -> None:
    rows = [{"pass": where, "layer": m.layer, "type": m.module_type} for where, ms in matches.items() for m in ms]
    out.print(_table("dry run: layers each pass would rewrite", rows))


def _print_untouched(coverage: dict) -> None:
    from ..inspection import untouched_rows
    if coverage:
        out.print(_table("weight matrices each pass rewrites, and the ones it leaves (why)", untouched_rows(coverage)))


def _print_groups(gm) -> None:
    try:
        from ..analysis.coupling import channel_groups
    except ImportError:
        return
    def channels(g) -> str:
        if not g.heads:
            return str(g.size)
        if g.heads_per_unit == 1:
            return f"{g.size} heads of {g.head_dim}"
        return f"{g.size} kv heads ({g.heads_per_unit} query heads each) of {g.head_dim}"

    rows = [{"group": str(g.id), "channels": channels(g), "fixed": g.reason if g.fixed else "",
             "parameters": ", ".join(f"{u.layer}.{u.param}[{u.dim}]" for u in g.uses[:6])
             + (f" (+{len(g.uses) - 6})" if len(g.uses) > 6 else "")}
            for g in channel_groups(gm)]
    out.print(_table("channel groups", rows))


def _describers(gm, passes) -> list[Table]:
    """Sections the spec's passes contribute (e.g. template banks): their `describe(gm)`."""
    tables = []
    for p in sorted({p.kind: p for p in passes}.values(), key=lambda p: p.kind):
        rows = p.describe(gm)
        if rows:
            tables.append(_table(p.kind, rows))
    return tables


def _table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in (rows[0] if rows else {"(none)": ""}):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(escape(str(v)) for v in r.values()))
    return table


def _write_graph(dot: str, fmt: str, output: Path | None) -> None:
    if fmt == "dot":
        if output:
            write_text(output, dot)
            out.print(f"wrote {output}", markup=False)
        else:
            sys.stdout.write(dot)
        return
    exe = shutil.which("dot")
    if exe is None:
        raise FxgrowError("--format svg needs Graphviz's `dot` program: install it with "
                          "`apt-get install graphviz` (Debian/Ubuntu) or `brew install graphviz`, "
                          "or use --format dot")
    svg = subprocess.run([exe, "-Tsvg"], input=dot.encode(), capture_output=True, check=True).stdout
    target = output or Path("graph.svg")
    write_text(target, svg.decode())
    out.print(f"wrote {target}", markup=False)


@command()
def fold(
    run: Path = typer.Argument(..., help="Run directory (or its checkpoint.pt)."),
    model: Optional[str] = typer.Argument(None, help="Default: the model the run recorded."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Default: RUN/folded.pt"),
    shrink: bool = typer.Option(False, "--shrink", help="Also remove the channels filter pruning "
                                                        "(prune_regrow granularity: filter) zeroed."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Fold a run's rewritten model into a plain one (no fxgrow nodes) and save it,
    with its state_dict beside it (`<name>_state_dict.pt`)."""
    from .. import api
    from ..fold import fold as fold_model
    from ..train.checkpoint import save_file

    output_file(output, "--output")
    spec, gm = api.restore(run, model, trust_code=trust_code)
    if shrink:
        from ..passes.prune_regrow_filters import export_pruned
        plain = export_pruned(gm, api.example_input(spec))
    else:
        plain = fold_model(gm)
    target = output or (run if run.is_dir() else run.parent) / "folded.pt"
    save_file(plain, target)
    save_file(plain.state_dict(), target.with_name(f"{target.stem}_state_dict.pt"))
    out.print(f"wrote {target} and {target.with_name(f'{target.stem}_state_dict.pt')}", markup=False)


@command()
def schema(output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file.")) -> None:
    """Print the spec's JSON Schema (for editor completion and validation)."""
    from ..specs.root import spec_json_schema
    text = spec_json_schema()
    if output_file(output, "--output"):
        write_text(output, text + "\n")
        out.print(f"wrote {output}", markup=False)
    else:
        sys.stdout.write(text + "\n")


# Commands other modules contribute (sub-model evaluation and extraction, plots...).
for _name in ("subnets", "plots"):
    try:
        _mod = importlib.import_module(f"{__package__}.{_name}")
    except ImportError as _e:
        if _e.name != f"{__package__}.{_name}":
            raise
        continue
    for _fn in getattr(_mod, "COMMANDS", []):
        command()(_fn)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
