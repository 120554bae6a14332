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
from kdsearch.search.interrupts import exit_code, install_cli_handlers
from kdsearch.spaces.errors import KdsearchError, TrialDiverged, UserError

EXIT_USAGE = 2


def _space(path: Optional[str]) -> Space:
    return load_space(path)


def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- validate


def cmd_validate(args: argparse.Namespace) -> int:
    """The resolved space on stdout, then what the probes found (the checks ``run`` makes first)."""
    import yaml

    from kdsearch.trainers.probes import probe_space

    space = _space(args.space)
    report = probe_space(space)
    print(yaml.safe_dump(space.describe(), sort_keys=False, default_flow_style=None).rstrip())
    for line in report.lines():
        print(f"# {line}", file=sys.stderr)
    print(f"# ok: {space.source}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    """One line per registered entry: ``name  description``, under a heading per kind (no Ray)."""
    from kdsearch.spaces.registry import REGISTRIES

    kinds = [args.kind] if args.kind else list(REGISTRIES)
    indent = "  " if len(kinds) > 1 else ""
    for i, kind in enumerate(kinds):
        registry = REGISTRIES[kind]
        names = registry.names()
        width = max((len(n) for n in names), default=0)
        if indent:
            print(("\n" if i else "") + f"{kind} (a {registry.kind} name, or a module:attr ref):")
        for name in names:
            kind = getattr(registry.get(name), "kind", None)  # a loss term's kind: logit or feature
            tag = f"[{kind}] " if isinstance(kind, str) else ""
            print(f"{indent}{name:<{width}}  {tag}{registry.describe(name).replace('``', '')}".rstrip())
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
    from kdsearch.trainers.probes import probe_space
    from kdsearch.trainers.trial import prepare, run_trial

    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: must be at least 1; fix: pass e.g. --epochs 2, or leave it out")
    space = _space(args.space)
    params = sample_params(space, args.params, args.seed)
    probe_space(space)
    context = prepare(space)  # checks the data and the teachers before anything is said
    _echo(f"trial: {params['student.family']} student on {space.data.source}, seed {args.seed}")
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
    from kdsearch.search.driver import run_search
    from kdsearch.search.options import SearchOptions

    options = SearchOptions.parse({k: getattr(args, k) for k in SearchOptions.model_fields if getattr(args, k, None) is not None})
    return _ended(run_search(args.space, options=options))


def cmd_resume(args: argparse.Namespace) -> int:
    from kdsearch.search.driver import resume_search

    return _ended(resume_search(args.path))


def _ended(result: Any) -> int:
    """Print the front; an interrupted search also says how to finish it and exits 130 (SIGINT) or 143 (SIGTERM)."""
    import signal

    _print_front(result.tracking_uri, result.parent_run_id)
    if not result.partial:
        return 0
    _echo(f"kdsearch: interrupted ({result.interrupted}): the front above is partial; trials in flight are marked "
          f"interrupted. Finish the search with: kdsearch resume {result.tune_path}")
    return 128 + signal.Signals[result.interrupted].value


def _print_front(tracking_uri: str, run_id: str) -> None:
    from kdsearch.search.tracking import client

    args = argparse.Namespace(tracking_uri=tracking_uri, experiment=None, run_id=run_id, json=False)
    print(file=sys.stderr)
    cmd_pareto(args, client(tracking_uri))


def cmd_pareto(args: argparse.Namespace, c: Any = None) -> int:
    from kdsearch.search.report import front_table
    from kdsearch.search.tracking import client, latest_search_run, read_artifact_json
    from kdsearch.search.ui import require_store

    c = c or client(require_store(args.tracking_uri))
    parent = latest_search_run(c, args.experiment, args.run_id)
    payload = read_artifact_json(c, parent.info.run_id, "pareto_front.json")
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        partial = " so far (interrupted: `kdsearch resume` finishes it)" if payload.get("partial") else ""
        print(f"search {parent.info.run_name} ({parent.info.run_id}): {len(payload['front'])} students on the front"
              f"{partial}, hypervolume {payload['hypervolume']:.4f} of the reference box")
        print(front_table(payload["front"], payload["objectives"]))
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from kdsearch.search.options import DEFAULT_TRACKING_URI

    parser = argparse.ArgumentParser(prog="kdsearch", description="Search knowledge-distillation students with Ray Tune.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and warnings")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add_parser(*a, formatter_class=DefaultsHelp, **kw)  # every --help shows defaults

    p = sub.add_parser("validate", help="check a space file and print it resolved")
    p.add_argument("space", nargs="?", help="space file (default: the built-in digits space)")
    p.set_defaults(func=cmd_validate)

    from kdsearch.spaces.registry import REGISTRIES  # no torch: the built-ins load on first lookup

    p = sub.add_parser("list", help="list the registered " + ", ".join(REGISTRIES))
    p.add_argument("kind", nargs="?", choices=tuple(REGISTRIES), help="one kind of entry (default: all)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("trial", help="run one distillation trial")
    p.add_argument("space", nargs="?", help="space file (default: the built-in digits space)")
    p.add_argument("--params", help="JSON object pinning knobs, e.g. '{\"student.family\": \"cnn\"}'")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled knobs and of training")
    p.add_argument("--epochs", type=int, help="distillation epochs (default: the space's train.epochs)")
    p.add_argument("--out", help="folder for the student artifact")
    p.set_defaults(func=cmd_trial)

    p = sub.add_parser("run", help="search the space with Ray Tune, log the Pareto front to MLflow")
    p.add_argument("space", nargs="?", help="space file (default: the built-in digits space)")
    _option_args(p)
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
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking store")
    p.add_argument("--port", type=int, default=5000, help="TCP port on 127.0.0.1")
    p.set_defaults(func=lambda args: __import__("kdsearch.search.ui", fromlist=["cmd_ui"]).cmd_ui(args))
    return parser


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` where there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def _shown(value: Any) -> str:
    """A default as a person writes it: 1/6 rather than 0.16666666666666666."""
    from fractions import Fraction

    if isinstance(value, float) and len(repr(value)) > 8:
        fraction = Fraction(value).limit_denominator(100)
        if abs(float(fraction) - value) < 1e-12:
            return str(fraction)
    return str(value)


def _option_args(p: argparse.ArgumentParser) -> None:
    """``kdsearch run``'s flags, one per :class:`SearchOptions` field: names, help and defaults from there."""
    import typing

    from kdsearch.search.options import SearchOptions

    for name, field in SearchOptions.model_fields.items():
        kind = field.annotation
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        shown = f" (default: {_shown(field.default)})" if field.default is not None else ""
        flag, help_ = "--" + name.replace("_", "-"), f"{field.description}{shown}"
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif choices:
            p.add_argument(flag, choices=choices, default=None, help=help_)
        else:
            p.add_argument(flag, type=kind if kind in (int, float) else str, default=None, help=help_)


def _tracking_args(p: argparse.ArgumentParser) -> None:
    from kdsearch.search.options import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking store")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")


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
    install_cli_handlers()
    if sys.stderr.isatty():  # a bar for the teacher phase where someone watches; logs stay clean
        from kdsearch.trainers.progress import show_progress, tqdm_reporter

        show_progress(tqdm_reporter)
    try:
        return args.func(args)
    except KdsearchError as exc:
        print(f"kdsearch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM as Interrupted, outside a search's trial loop
        print("kdsearch: interrupted", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
