"""``kdsearch``: the command line.

Bad input ends with one line naming the field and the fix, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Optional

from kdsearch.spaces import PinnedSuggester, RandomSuggester, Space, load_space
from kdsearch.spaces.errors import KdsearchError, TrialDiverged, UserError

EXIT_USAGE = 2


def _space(path: Optional[str]) -> Space:
    return load_space(path)


def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- validate


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    space = _space(args.space)
    print(yaml.safe_dump(space.describe(), sort_keys=False, default_flow_style=None).rstrip())
    print(f"# ok: {space.source}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- trial


def sample_params(space: Space, pinned_json: Optional[str], seed: int) -> dict[str, Any]:
    """A configuration: the pinned values from ``--params`` and the rest sampled with ``seed``."""
    pinned: dict[str, Any] = {}
    if pinned_json:
        try:
            pinned = json.loads(pinned_json)
        except json.JSONDecodeError as exc:
            raise UserError(f"--params: not valid JSON ({exc.msg}); fix: pass an object like '{{\"train.lr\": 0.01}}'") from None
        if not isinstance(pinned, dict):
            raise UserError("--params: expected a JSON object; fix: pass an object like '{\"train.lr\": 0.01}'")
    suggester = PinnedSuggester(pinned, RandomSuggester(seed))
    params = space.sample(suggester)
    for name in pinned:
        if name not in suggester.used:
            params[name] = pinned[name]  # fixed knobs and other families' knobs: resolve() judges them
    space.resolve(params)
    return params


def cmd_trial(args: argparse.Namespace) -> int:
    from kdsearch.trainers.trial import prepare, run_trial

    space = _space(args.space)
    params = sample_params(space, args.params, args.seed)
    _echo(f"trial: {params['student.family']} student on {space.data.source}, seed {args.seed}")
    context = prepare(space)
    _echo(f"teacher: {context.targets.description}, val_acc {context.targets.val_acc:.4f}")

    def progress(metrics: dict[str, Any], state: Any = None) -> None:
        if "size_bytes" not in metrics:  # the last report is printed whole below
            _echo(f"  epoch {metrics['epoch']:>3}  {metrics['phase']:<8} loss {metrics['train_loss']:.4f}  val_acc {metrics['val_acc']:.4f}")

    try:
        result = run_trial(space, params, progress, context=context, seed=args.seed, epochs=args.epochs,
                           artifact_dir=args.out)
    except TrialDiverged as exc:
        raise UserError(f"trial failed: {exc}; fix: lower train.lr or change the seed") from None
    _echo(
        f"val_acc {result['val_acc']:.4f} (teacher {result['teacher_val_acc']:.4f})  params {result['params']:,}  "
        f"macs {result['macs']:,}  size {result['size_bytes']:,} B  latency {result['latency_ms']:.3f} ms "
        f"(IQR {result['latency_iqr_ms']:.3f})  in {result['train_seconds']:.1f} s"
    )
    print(json.dumps(result, default=str))
    return 0


# --------------------------------------------------------------------------- run / pareto


def cmd_run(args: argparse.Namespace) -> int:
    from kdsearch.search.driver import SearchOptions, run_search

    given = {k: getattr(args, k) for k in SearchOptions.__dataclass_fields__ if getattr(args, k, None) is not None}
    options = SearchOptions(**given)
    if options.num_samples < 1 or options.max_concurrent < 1:
        raise UserError("--num-samples and --max-concurrent must be at least 1; fix: pass a positive number")
    if not options.grace_period > 0 or options.reduction_factor < 2:
        raise UserError("--grace-period must be above 0 and --reduction-factor at least 2; fix: e.g. --grace-period 0.34 "
                        "--reduction-factor 3")
    run_search(options)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from kdsearch.search.driver import resume_search

    resume_search(args.path)
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from kdsearch.search.report import front_table
    from kdsearch.search.tracking import client, latest_search_run, read_artifact_json

    c = client(args.tracking_uri)
    parent = latest_search_run(c, args.experiment, args.run_id)
    payload = read_artifact_json(c, parent.info.run_id, "pareto_front.json")
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"search {parent.info.run_name} ({parent.info.run_id}): hypervolume {payload['hypervolume']:.4g}")
        print(front_table(payload["front"], payload["objectives"]))
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdsearch", description="Search knowledge-distillation students with Ray Tune.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a space file and print it resolved")
    p.add_argument("space", nargs="?", help="space file (default: the built-in digits space)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("trial", help="run one distillation trial")
    p.add_argument("space", nargs="?", help="space file (default: the built-in digits space)")
    p.add_argument("--params", help="JSON object pinning knobs, e.g. '{\"student.family\": \"cnn\"}'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="distillation epochs (default: the space's train.epochs)")
    p.add_argument("--out", help="folder for the student artifact")
    p.set_defaults(func=cmd_trial)

    p = sub.add_parser("run", help="search the space with Ray Tune, log the Pareto front to MLflow")
    p.add_argument("space", nargs="?", help="space file (default: the built-in digits space)")
    p.add_argument("--num-samples", type=int, default=24, help="trials to run")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at a time")
    p.add_argument("--address", help="an existing Ray cluster (default: start Ray in this process)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions pack several students on one GPU")
    _tracking_args(p)
    p.add_argument("--storage", help="Ray Tune storage path (default: ./ray_results); shared on a cluster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--searcher", choices=("nsga2", "tpe", "random"), default="nsga2")
    p.add_argument("--scheduler", default="pareto-asha", help="pareto-asha (default) | asha | none")
    p.add_argument("--max-failures", type=int, default=3, help="retries of a trial whose worker died")
    p.add_argument("--epochs", type=int, help="override the space's distillation epochs")
    p.add_argument("--budget-epochs", type=float, help="stop the search once all trials together trained this many epochs")
    p.add_argument("--grace-period", type=float,
                   help="epochs before a trial can be stopped, the first rung (default 1/6: trials report inside epochs)")
    p.add_argument("--reduction-factor", type=int, help="ASHA's eta (default 4): rungs eta times apart, 1/eta go on")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="finish a search whose driver was killed (same MLflow parent run)")
    p.add_argument("path", help="the tune folder `kdsearch run` printed (storage/name)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("pareto", help="print the front of the latest (or a given) search")
    _tracking_args(p)
    p.add_argument("--run-id", help="a search's parent run id")
    p.add_argument("--json", action="store_true", help="print pareto_front.json")
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("export", help="export the most accurate front student that meets the limits")
    _tracking_args(p)
    p.add_argument("--run-id", help="a search's parent run id (default: the latest search)")
    p.add_argument("--max-latency-ms", type=float, help="limit on batch-1 latency")
    p.add_argument("--max-params", type=int, help="limit on parameters")
    p.add_argument("--max-size-bytes", type=int, help="limit on the artifact's bytes on disk")
    p.add_argument("--out", default="exports", help="output folder")
    p.add_argument("--format", default="onnx,pt2,state_dict", help="comma-separated: onnx, pt2, state_dict")
    p.add_argument("--register", metavar="NAME", help="register the student in the MLflow Model Registry")
    p.set_defaults(func=lambda args: __import__("kdsearch.search.export", fromlist=["cmd_export"]).cmd_export(args))

    p = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1 over the same store")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking store")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=lambda args: __import__("kdsearch.search.ui", fromlist=["cmd_ui"]).cmd_ui(args))
    return parser


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking store")
    p.add_argument("--experiment", default="kdsearch", help="MLflow experiment")


def _quiet(verbose: bool) -> None:
    import os
    import warnings

    level = logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        for name in ("ray", "mlflow", "optuna", "alembic", "urllib3", "torch"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet(args.verbose)
    try:
        return args.func(args)
    except KdsearchError as exc:
        print(f"kdsearch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kdsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
