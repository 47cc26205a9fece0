"""The ``xai-pipeline`` command.

    xai-pipeline plan CONFIG --out RUN_DIR      plan shards into a run folder
    xai-pipeline run CONFIG --out RUN_DIR       plan, run pending shards locally, reduce
    xai-pipeline reduce RUN_DIR                 merge shards into results.h5 and tables
    xai-pipeline status RUN_DIR                 what is done, pending, failed
    xai-pipeline demo [--out runs/demo]         self-made data and model, then `run`
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser"]


def _print_failures(failures: dict[str, str]) -> None:
    print(f"{len(failures)} shard(s) failed:", file=sys.stderr)
    for shard_id, message in list(failures.items())[:20]:
        print(f"  {shard_id}: {message.splitlines()[0] if message else ''}", file=sys.stderr)


def _finish(run_dir: Path, progress: bool | None) -> int:
    from .launching import run_local
    from .reduce import reduce_run

    failures = run_local(run_dir, progress=progress)
    if failures:
        _print_failures(failures)
        print(f"see `xai-pipeline status {run_dir}`; fix the cause, then `xai-pipeline run` again "
              "(committed shards are kept)", file=sys.stderr)
        return 1
    result = reduce_run(run_dir, progress=progress)
    print((run_dir / "summary.md").read_text())
    if result.failures:
        print(f"{len(result.failures)} image(s) failed; see {run_dir / 'failures.csv'}")
    print(f"results: {result.results}\ntables:  {run_dir / 'metrics.csv'}, {run_dir / 'summary.csv'}, "
          f"{run_dir / 'summary.md'}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .rundir import plan_run

    plan = plan_run(load_config(args.config), args.out, overwrite=args.overwrite)
    stages = {stage: len(plan.stage(stage)) for stage in ("explain", "score")}
    print(f"planned {len(plan.records)} images: {stages['explain']} explain and {stages['score']} score shards "
          f"in {args.out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    _cmd_plan(args)
    return _finish(Path(args.out), args.progress)


def _cmd_reduce(args: argparse.Namespace) -> int:
    from .reduce import reduce_run

    result = reduce_run(args.run_dir, progress=args.progress)
    print((Path(args.run_dir) / "summary.md").read_text())
    print(f"results: {result.results}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import run_status

    report = run_status(args.run_dir)
    print(report.describe())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import prepare_demo

    config_path = prepare_demo(args.out, images_per_class=args.images_per_class)
    print(f"demo config: {config_path}")
    run_dir = Path(args.out) / "run"
    args.config, args.out, args.overwrite = config_path, run_dir, True
    return _cmd_run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xai-pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars (default: only on a terminal)")
        return p

    for name, handler, text in (
        ("plan", _cmd_plan, "plan the shards of CONFIG into a run folder"),
        ("run", _cmd_run, "plan, run pending shards locally, and reduce"),
    ):
        p = command(name, handler, text)
        p.add_argument("config", type=Path, help="experiment YAML")
        p.add_argument("--out", type=Path, required=True, help="run folder")
        p.add_argument("--overwrite", action="store_true", help="replace a run of another config in --out")
    p = command("reduce", _cmd_reduce, "merge committed shards into results.h5 and tables")
    p.add_argument("run_dir", type=Path)
    p = command("status", _cmd_status, "shards done, running, pending and failed")
    p.add_argument("run_dir", type=Path)
    p = command("demo", _cmd_demo, "generate shapes data, train a small CNN, run the pipeline on it")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    p.add_argument("--images-per-class", type=int, default=10)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .models import ModelError
    from .reduce import ReduceError
    from .rundir import RunDirError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataError, ModelError, ReduceError, RunDirError, FileNotFoundError) as error:
        if args.traceback:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
