"""The ``xai-pipeline`` command.

    xai-pipeline layers CONFIG                  the model's CAM layers with their output shapes
    xai-pipeline methods [NAME ...]             every method with its parameters' meaning, unit, default, range
    xai-pipeline metrics [NAME ...]             every metric with its parameters' meaning, unit, default, range
    xai-pipeline plan CONFIG --out RUN_DIR      plan shards into a run folder; print what they cost
    xai-pipeline run CONFIG --out RUN_DIR       plan, run pending shards locally, reduce
                 [--profile jobs/clusters/NAME.yaml] [--executor slurm]   ... or submit them to SLURM
    xai-pipeline launch RUN_DIR --profile P     pre-flight checks, then run or submit the pending shards
    xai-pipeline resume RUN_DIR [--profile P]   run or submit again what is not committed
    xai-pipeline cancel RUN_DIR                 cancel the run's SLURM jobs
    xai-pipeline reduce RUN_DIR                 merge shards into results.h5 and tables
    xai-pipeline status RUN_DIR [--json|--watch] what is done, running, pending, failed, waiting
    xai-pipeline logs RUN_DIR SHARD_ID          the log section of the shard's last SLURM attempt
    xai-pipeline demo [--out runs/demo]         self-made data and model, then `run`
    xai-pipeline report RUN_DIR                 figures and tables in RUN_DIR/report/index.html
    xai-pipeline compare RUN_DIR                paired tests between methods: RUN_DIR/comparison.{csv,md}
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from .parameters import ParameterInfo
    from .stages.reduce import ReduceResult

__all__ = ["main", "build_parser"]

#: the commands that write a run folder: one at a time holds its lock
_WRITERS = frozenset({"plan", "run", "launch", "resume", "reduce", "cancel", "demo", "compare"})


def _print_failures(failures: dict[str, str]) -> None:
    print(f"{len(failures)} shard(s) failed:", file=sys.stderr)
    for shard_id, message in list(failures.items())[:20]:
        print(f"  {shard_id}: {message.splitlines()[0] if message else ''}", file=sys.stderr)


def _print_results(run_dir: Path, result: "ReduceResult") -> int:
    """Print the tables' paths, the summary, its warnings and, last, which differences between methods
    are significant; 1 when a method has no usable map, else 0."""
    from .run_dir import RunDir

    folder = RunDir(run_dir)
    tables = [folder.metrics_parquet, folder.metrics_csv, folder.summary_csv, folder.summary_md, folder.comparison_csv]
    print(f"results: {result.results}\ntables:  {', '.join(str(p) for p in tables if p.is_file())}\n")
    print(folder.summary_md.read_text())
    _print_warnings(result)
    if result.failures:
        print(f"{len(result.failures)} image(s) failed; see {folder.failures_csv}")
    if folder.comparison_md.is_file():
        print(folder.comparison_md.read_text())
    return 1 if result.warnings.degenerate_methods else 0


def _print_warnings(result: "ReduceResult") -> None:
    """The run's warnings (as in warnings.md), or nothing."""
    if result.warnings.lines:
        print(result.warnings.markdown())


def _cmd_layers(args: argparse.Namespace) -> int:
    from .config import load_config
    from .methods.layers import candidate_layers, default_layer
    from .models import build_model

    config = load_config(args.config)
    model = build_model(config.model)
    size = config.data.image_size
    layers = candidate_layers(model, size)
    default = default_layer(model, size)
    rows = [("layer", "module", "output shape", "CAM grid")] + [
        (info.name + (" (default)" if info.name == default else ""), info.kind,
         " x ".join(map(str, info.shape)), " x ".join(map(str, info.grid or ())))
        for info in layers
    ]
    print(f"{len(layers)} layers of the model for {size[0]}x{size[1]} images (shapes per image):")
    _print_table(rows)
    return 0


def _print_table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_parameters(heading: str, parameters: "list[ParameterInfo]") -> None:
    print(f"\n{heading}")
    if not parameters:
        print("  (no parameters)")
        return
    _print_table([("parameter", "type", "default", "range", "unit", "meaning")] + [
        (p.name, p.type, "(required)" if p.default is None else p.default, p.range, p.unit, p.meaning)
        for p in parameters
    ], indent="  ")


def _summary(documented: object) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join((getattr(documented, "__doc__", None) or "").strip().split("\n\n")[0].split())


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import CamExplainer, method_class, method_info, method_names

    try:
        for name in args.names or method_names():
            cls = method_class(name)
            cam = " (CAM: `layer` is the entry's `layers`)" if issubclass(cls, CamExplainer) else ""
            _print_parameters(f"{name}{cam}: {_summary(cls)}", method_info(name))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.names:
        print("\ncaptum:NAME and grad-cam:NAME (pip install 'xai-pipeline[backends]'): the library's classes, "
              "e.g. `xai-pipeline methods captum:IntegratedGradients grad-cam:ScoreCAM`")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from .metrics import metric_info, metric_names, metric_spec

    try:
        for name in args.names or metric_names():
            spec = metric_spec(name)
            needs = ", ".join(n for n, needed in (("the model", spec.needs_model),
                                                  ("ground truth", spec.needs_ground_truth)) if needed)
            _print_parameters(f"{name} ({spec.label}{'; needs ' + needs if needs else ''}): "
                              f"{_summary(spec.function)}", metric_info(name))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .cost import CostEstimate
    from .planning import Plan
    from .run_dir import RunDir
    from .rundir import RunDirError, plan_run, replan_changes

    if args.delete_dropped and not args.update:
        raise RunDirError("--delete-dropped goes with --update (the shards a re-plan no longer plans)")
    folder = RunDir(args.out)
    before = Plan.read(folder.plan) if folder.plan.is_file() and not args.overwrite else None
    committed = folder.committed()
    plan = plan_run(load_config(args.config), args.out, overwrite=args.overwrite, update=args.update,
                    hash_inputs=args.hash_inputs, delete_dropped=args.delete_dropped)
    stages = {stage: len(plan.stage(stage)) for stage in ("explain", "score")}
    planned = {s.id for s in plan.shards}
    done = len(folder.committed() & planned)
    kept = f" ({done} already committed)" if done else ""
    print(f"planned {plan.image_count} images: {stages['explain']} explain and {stages['score']} score shards "
          f"in {args.out}{kept}")
    if before is not None and {s.id for s in before.shards} != planned:
        changes = replan_changes(before, plan, committed)
        print("re-planned " + "\n".join(changes.describe()))
        if sum(changes.dropped.values()):
            where = ("deleted" if args.delete_dropped else f"moved to {folder.dropped}, never read again"
                     if args.update else f"left in {folder.shards}, used again if planned again")
            print(f"the files of the dropped shards: {where}")
    if folder.cost.is_file():
        print(CostEstimate.read(folder.cost).describe())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    _cmd_plan(args)
    return _launch(Path(args.out), args, check=False)


def _launch(run_dir: Path, args: argparse.Namespace, *, check: bool) -> int:
    from .launching.launch import launch_run, resolve_profile
    from .stages.reduce import CorruptShardsFound, reduce_run

    profile = resolve_profile(run_dir, args.profile, args.executor)
    force = getattr(args, "force", False)
    result = launch_run(run_dir, profile, force=force, check=check, progress=args.progress)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(result.describe())
    if profile.executor == "slurm":
        return 0
    if result.failures:
        return _failed(run_dir, result.failures)
    try:
        reduced = reduce_run(run_dir, progress=args.progress)
    except CorruptShardsFound as error:  # quarantined by the reduce: compute them again, once
        print(f"warning: {error}", file=sys.stderr)
        again = launch_run(run_dir, profile, check=False, progress=args.progress)
        print(again.describe())
        if again.failures:
            return _failed(run_dir, again.failures)
        reduced = reduce_run(run_dir, progress=args.progress)
    return _print_results(run_dir, reduced)


def _failed(run_dir: Path, failures: dict[str, str]) -> int:
    _print_failures(failures)
    print(f"see `xai-pipeline status {run_dir}`; fix the cause, then `xai-pipeline resume {run_dir}` "
          "(committed shards are kept)", file=sys.stderr)
    return 1


def _cmd_launch(args: argparse.Namespace) -> int:
    return _launch(Path(args.run_dir), args, check=True)


def _cmd_cancel(args: argparse.Namespace) -> int:
    from .launching.launch import cancel_run

    cancelled = cancel_run(Path(args.run_dir))
    print(f"cancelled job(s) {', '.join(cancelled)}" if cancelled else "no job of this run is queued or running")
    return 0


def _cmd_reduce(args: argparse.Namespace) -> int:
    from .stages.reduce import reduce_run

    result = reduce_run(args.run_dir, progress=args.progress, group_by_class=args.by_class)
    return _print_results(Path(args.run_dir), result)


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    import time

    from .status import run_status

    while True:
        report = run_status(args.run_dir, verify=args.verify)
        if args.json:
            print(json.dumps(report.to_json(), indent=1), flush=True)
        else:
            clear = "\033[H\033[2J" if args.watch and sys.stdout.isatty() else ""
            print(f"{clear}{report.describe()}", flush=True)
        if not args.watch or report.reduced or not report.active:
            return 0
        time.sleep(args.interval)


def _cmd_logs(args: argparse.Namespace) -> int:
    from .launching.logs import shard_log

    print(shard_log(args.run_dir, args.shard_id, lines=args.lines))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import prepare_demo

    config_path = prepare_demo(args.out, images_per_class=args.images_per_class)
    print(f"demo config: {config_path}")
    run_dir = Path(args.out) / "run"
    args.config, args.out, args.overwrite, args.update, args.hash_inputs = config_path, run_dir, True, False, None
    args.delete_dropped = False
    args.profile, args.executor = None, "local"
    return _cmd_run(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from .analysis import write_report

    index = write_report(args.run_dir, metric=args.metric, images=args.images, pdf=args.pdf, progress=args.progress)
    print(f"report: {index}\n        {index.with_name('report.md')}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from .comparison import write_comparison
    from .run_dir import RunDir

    folder = RunDir(args.run_dir)
    write_comparison(pd.read_parquet(folder.metrics_parquet), folder.root)
    print(f"comparison: {folder.comparison_csv}\n            {folder.comparison_md}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xai-pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler, writes=name in _WRITERS)
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars (default: only on a terminal)")
        return p

    def launch_options(p: argparse.ArgumentParser, profile_help: str) -> None:
        p.add_argument("--profile", type=Path, help=profile_help)
        p.add_argument("--executor", choices=("local", "slurm"), help="override the profile's executor")

    p = command("layers", _cmd_layers, "list the model's candidate CAM layers with their output shapes, "
                "marking the default")
    p.add_argument("config", type=Path, help="experiment YAML")
    for name, handler, text in (
        ("methods", _cmd_methods, "list the explanation methods with each parameter's meaning, unit, default "
                                  "and range"),
        ("metrics", _cmd_metrics, "list the metrics with each parameter's meaning, unit, default and range"),
    ):
        p = command(name, handler, text)
        p.add_argument("names", nargs="*", metavar="NAME", help="only these (any name a config accepts)")
    for name, handler, text in (
        ("plan", _cmd_plan, "plan the shards of CONFIG into a run folder"),
        ("run", _cmd_run, "plan, run pending shards locally (or submit them with a slurm profile), and reduce"),
    ):
        p = command(name, handler, text)
        p.add_argument("config", type=Path, help="experiment YAML")
        p.add_argument("--out", type=Path, required=True, help="run folder")
        replace = p.add_mutually_exclusive_group()
        replace.add_argument("--update", action="store_true",
                             help="plan a changed config into --out, reusing the shards it still plans")
        replace.add_argument("--overwrite", action="store_true", help="replace a run of another config in --out")
        p.add_argument("--delete-dropped", action="store_true",
                       help="with --update: delete the shards no longer planned (default: moved to shards/dropped/)")
        p.add_argument("--hash-inputs", action="store_const", const=True, default=None,
                       help="fingerprint input files by SHA-256, not size and time (kept by later re-plans)")
        if name == "run":
            launch_options(p, "cluster profile (jobs/clusters/NAME.yaml); default: run locally")
    for name, handler, text in (
        ("launch", _cmd_launch, "pre-flight checks, then run the pending shards locally or submit them to SLURM"),
        ("resume", _cmd_launch, "run or submit again exactly the shards that are not committed"),
    ):
        p = command(name, handler, text)
        p.add_argument("run_dir", type=Path)
        launch_options(p, "cluster profile (jobs/clusters/NAME.yaml); default: the run's last profile, else local")
        p.add_argument("--force", action="store_true", help="recompute committed shards too")
    p = command("cancel", _cmd_cancel, "cancel the run's queued and running SLURM jobs")
    p.add_argument("run_dir", type=Path)
    p = command("reduce", _cmd_reduce, "merge committed shards into results.h5 and tables")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--by-class", action="store_true", help="summary rows per method, layer and class")
    p = command("status", _cmd_status, "shards done, running, pending, failed and waiting on input")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--verify", action="store_true",
                   help="read every committed shard (checksums, digest) and compare the input files with "
                        "the plan (slower)")
    p.add_argument("--watch", action="store_true", help="refresh until the run's jobs have ended")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes (default 10)")
    p = command("logs", _cmd_logs, "print the log section of a shard's last SLURM attempt (.out and .err)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("shard_id")
    p.add_argument("--lines", type=int, default=200, help="the most lines shown per log (default 200)")
    p = command("demo", _cmd_demo, "generate shapes data, train a small CNN, run the pipeline on it")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    p.add_argument("--images-per-class", type=int, default=8)
    p = command("report", _cmd_report, "write an HTML and Markdown report of a finished run into RUN_DIR/report")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--metric", default=None,
                   help="metric that picks each method's best, typical and worst images (default: insertion)")
    p.add_argument("--images", type=int, default=3, metavar="N",
                   help="images per group (best, typical, worst) and in the overview sample (default 3)")
    p.add_argument("--pdf", action="store_true", help="also save every figure as PDF")
    p = command("compare", _cmd_compare, "paired tests between methods into RUN_DIR/comparison.csv and .md")
    p.add_argument("run_dir", type=Path)
    return parser


def _run_folder(args: argparse.Namespace) -> Path:
    """The folder a command works on (``--out`` of plan, run and demo)."""
    return Path(getattr(args, "run_dir", None) or args.out)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM (``kill``, a local scheduler) stops the command as Ctrl-C does:
    the progress of the shard in progress is saved and the command says how to continue."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(folder: Path) -> int:
    """Say what an interrupted command leaves; the exit status of SIGINT."""
    from .run_dir import RunDir

    committed = len(RunDir(folder).committed()) if folder.is_dir() else 0
    print(f"\ninterrupted: {committed} shard(s) are committed in {folder} (and the samples done of the shard "
          "in progress saved); run the same command again to continue from there", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import PipelineError
    from .run_dir import RunDir

    try:
        if not args.writes:
            return args.handler(args)
        with RunDir(_run_folder(args)).locked(), _terminate_as_interrupt():
            return args.handler(args)
    except KeyboardInterrupt:
        if args.traceback or not args.writes:
            raise
        return _interrupted(_run_folder(args))
    except (PipelineError, FileNotFoundError) as error:
        if args.traceback:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
