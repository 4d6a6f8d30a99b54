"""What ``sae-diff train``, ``harvest`` and ``upload`` do: parse the config, check, call the library.

Each handler takes the parsed arguments and the flags argparse did not know (config
overrides) and returns the exit status. ``sae_diff.training`` is imported inside the handlers
on purpose: it imports the whole trainer, which ``sae-diff --help`` and the other subcommands
do not need.
:data:`ANALYSIS_METHODS` names the analyses a config can select with a top-level ``method:``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_diff.commands.preflight import preflight_cache, preflight_datasets
from sae_diff.hub import upload_dictionaries

if TYPE_CHECKING:  # pragma: no cover
    from sae_diff.training.config import PairedRunnerConfig
    from sae_diff.training.runner import PairedSAETrainingRunner


def _print_plan(cfg: PairedRunnerConfig, as_json: bool) -> None:
    from sae_diff.training.plan import make_plan

    plan = make_plan(cfg)
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print("Plan (dry run: nothing was loaded)")
        print(plan.render())


#: multi-run analyses a config names with a top-level ``method:``; ``sae-diff train`` and their
#: own subcommands hand such a config to the module's ``main`` (module, what, subcommand)
ANALYSIS_METHODS: dict[str, tuple[str, str]] = {
    "stagewise": ("sae_diff.analysis.stagewise", "stage-wise diffing"),
    "causal_filter": ("sae_diff.analysis.causal_filter", "causal filter"),
}


def analysis_method(path: str | Path) -> str | None:
    """The config's ``method:`` when it names one of :data:`ANALYSIS_METHODS` (else None:
    a training config). Unreadable files are left to the training config's own errors."""
    from sae_diff.training.config import read_config_file

    try:
        data = read_config_file(path)
    except Exception:
        return None
    method = data.get("method") if isinstance(data, dict) else None
    return method if method in ANALYSIS_METHODS else None


def parse_config(path: str | Path | None, rest: list[str], **kwargs: Any) -> PairedRunnerConfig:
    """``sae_diff.training.flags.parse_config`` with unparsable files reported as a
    ``ConfigError`` naming the file (YAML and JSON parsers do not)."""
    from sae_diff.training.config import ConfigError
    from sae_diff.training.flags import parse_config as parse

    try:
        return parse(path, rest, **kwargs)
    except ConfigError:
        raise
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot parse the config file {path}: {e}. Fix its syntax.") from e
    except Exception as e:
        import yaml

        if isinstance(e, yaml.YAMLError):
            raise ConfigError(
                f"cannot parse the config file {path}: {' '.join(str(e).split())}. "
                "Fix its YAML syntax."
            ) from e
        raise


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:

    if args.help_config:
        from sae_diff.training.flags import config_flags_help

        print(config_flags_help(args.config, args.architecture))
        return 0
    if args.resume:
        from sae_diff.training.runner import (
            PairedSAETrainingRunner,
            check_resume_config,
            find_checkpoint,
        )

        ckpt = find_checkpoint(args.resume)
        cfg = parse_config(
            ckpt / "runner_cfg.json",
            rest,
            architecture=args.architecture,
            keep_checkpoint_path=True,
        )
        cfg.resume_from_checkpoint = str(ckpt)
        check_resume_config(ckpt, cfg)
        preflight_cache(cfg, what=f"the checkpoint's config ({ckpt})")
        if args.dry_run:
            print(f"Would resume from {ckpt}")
            _print_plan(cfg, args.json)
            return 0
        print(f"Resuming from {ckpt}")
        runner = PairedSAETrainingRunner(cfg)
    else:
        if args.config is None and args.architecture is None:
            print(
                "sae-diff train: error: give --config FILE (or --architecture NAME and flags). "
                "See `sae-diff train --help`.",
                file=sys.stderr,
            )
            return 2
        if args.config is not None and (method := analysis_method(args.config)) is not None:
            module, what = ANALYSIS_METHODS[method]
            return delegate(module, ["--config", str(args.config), *rest], what)
        cfg = parse_config(args.config, rest, architecture=args.architecture)
        preflight_datasets(cfg)
        preflight_cache(cfg)
        if args.dry_run:
            _print_plan(cfg, args.json)
            return 0
        from sae_diff.training.runner import PairedSAETrainingRunner

        runner = PairedSAETrainingRunner(cfg)
    from sae_diff.training.trainer import TrainingInterrupted

    try:
        runner.run()
    except TrainingInterrupted as e:
        print(f"sae-diff train: interrupted; {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(
            f"sae-diff train: interrupted before the first checkpoint; {_train_resume_hint(args, cfg)}",
            file=sys.stderr,
        )
        return 130
    _print_summary(runner)
    return 0


def _train_resume_hint(args: argparse.Namespace, cfg: PairedRunnerConfig) -> str:
    """How to continue a run stopped before training saved anything (a partial cache
    harvest resumes by itself)."""
    if cfg.checkpoint_path:
        from sae_diff.training.runner import find_checkpoint

        try:
            return f"resume with: sae-diff train --resume {find_checkpoint(cfg.checkpoint_path)}"
        except FileNotFoundError:
            pass
    again = f"--resume {args.resume}" if args.resume else f"--config {args.config}"
    return f"resume with: sae-diff train {again} (a partly harvested cache_path continues where it stopped)"


def _print_summary(runner: PairedSAETrainingRunner) -> None:
    cfg = runner.cfg
    print(f"Trained {cfg.architecture} on {cfg.store_mode} activations at {cfg.hook_name}.")
    for k, v in runner.eval_metrics.items():
        print(f"  {k:60s} {v:.4g}" if isinstance(v, float) else f"  {k:60s} {v}")
    if cfg.output_path:
        print(f"Saved to {cfg.output_path} (load with SAE.load_from_disk after `import sae_diff`).")


def cmd_harvest(args: argparse.Namespace, rest: list[str]) -> int:
    from sae_diff.training.data import harvest

    if args.cache_path:
        rest = [*rest, "--cache_path", args.cache_path]
    cfg = parse_config(args.config, rest)
    if cfg.cache_path is None:
        print(
            "sae-diff harvest: error: the config has no cache_path; set it or pass --cache-path DIR.",
            file=sys.stderr,
        )
        return 2
    preflight_datasets(cfg)
    if not args.overwrite:
        preflight_cache(cfg)
    try:
        summary = harvest(cfg, overwrite=args.overwrite)
    except KeyboardInterrupt:
        again = " ".join(
            [
                "sae-diff harvest --config",
                str(args.config),
                *(["--cache-path", str(args.cache_path)] if args.cache_path else []),
            ]
        )
        print(
            f"sae-diff harvest: interrupted; the shards written so far are kept in {cfg.cache_path}; "
            f"resume with: {again}",
            file=sys.stderr,
        )
        return 130
    print(summary)
    return 0


def cmd_upload(args: argparse.Namespace, rest: list[str]) -> int:

    if rest:
        print(f"sae-diff upload: error: unrecognised arguments {rest}", file=sys.stderr)
        return 2
    ids = args.sae_id or [Path(p).resolve().name for p in args.paths]
    if len(ids) != len(args.paths):
        print("sae-diff upload: error: give one --sae-id per folder (or none).", file=sys.stderr)
        return 2
    metadata: dict[str, Any] = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            print(
                f"sae-diff upload: error: --metadata expects KEY=VALUE, got {item!r}",
                file=sys.stderr,
            )
            return 2
        metadata[key] = value
    url = upload_dictionaries(
        dict(zip(ids, args.paths)),
        args.repo_id,
        revision=args.revision,
        private=args.private,
        metadata=metadata or None,
        readme=not args.no_readme,
    )
    print(f"Uploaded {len(ids)} dictionar{'y' if len(ids) == 1 else 'ies'} to {url}")
    for sae_id in ids:
        print(f'  SAE.from_pretrained("{args.repo_id}", "{sae_id}")')
    return 0


def delegate(module: str, argv: list[str], what: str) -> int:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if e.name and not module.startswith(e.name) and e.name != module:
            raise
        print(
            f"sae-diff: the {what} is not available in this installation ({module} is missing).",
            file=sys.stderr,
        )
        return 2
    main = getattr(mod, "main", None)
    if main is None:
        print(f"sae-diff: {module} has no main(argv).", file=sys.stderr)
        return 2
    return int(main(argv) or 0)


__all__ = [
    "ANALYSIS_METHODS",
    "analysis_method",
    "cmd_harvest",
    "cmd_train",
    "cmd_upload",
    "delegate",
    "parse_config",
]
