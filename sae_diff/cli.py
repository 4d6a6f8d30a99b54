"""``sae-diff``: the command line of sae_diff (thin: parse, then call the library).

Subcommands: ``harvest``, ``train``, ``upload``, ``organism``, ``demo``. Run
``sae-diff <command> --help`` for each; ``docs/training.md`` has the full story.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

DESCRIPTION = """\
Model diffing with crosscoders and diff-SAEs, on SAELens and TransformerLens.

A run is described by a SAELens-style config (YAML or JSON): SAELens's
LanguageModelSAERunnerConfig fields plus the pair (base_model_name; model_name is the
fine-tune), store_mode, masks and cache_path. Any field can be overridden by a flag.
"""

EPILOG = """\
examples:
  sae-diff train --config configs/smoke_test_crosscoder.yaml
  sae-diff train --config configs/gemma2_2b_batchtopk_crosscoder_l13.yaml --dry-run
  sae-diff train --config my.yaml --lr 1e-4 --k 50 --training_tokens 50_000_000
  sae-diff train --resume checkpoints/3f9a1c2e          # continue an interrupted run
  sae-diff harvest --config my.yaml                     # fill cache_path first
  sae-diff upload output/ --repo-id me/gemma2-crosscoders --sae-id l13-batchtopk
"""

TRAIN_EPILOG = """\
config flags:
  Every config field is also a flag and overrides the file: --lr 1e-4, --training_tokens
  1_000_000, --k 64, --d_sae 16384, --base_model_name google/gemma-2-2b, --log_to_wandb true.
  List them all for an architecture with:  sae-diff train --config FILE --help-config
  (or --architecture NAME --help-config).

outputs:
  output_path/     the inference dictionary in SAELens layout (cfg.json,
                   sae_weights.safetensors), sparsity.safetensors, runner_cfg.json, eval.json
  checkpoint_path/ one folder per checkpoint (written atomically); resume with --resume
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-diff", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from sae_diff import __version__

    p.add_argument("--version", action="version", version=f"sae-diff {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a crosscoder / diff-SAE / SAE from a config",
                       description="Train a dictionary on a model pair with SAELens's SAETrainer.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", "-c", metavar="FILE", help="YAML or JSON run config")
    t.add_argument("--architecture", metavar="NAME",
                   help="override sae.architecture (crosscoder, batchtopk_crosscoder, batchtopk_diff_sae, "
                        "or any SAELens architecture such as batchtopk)")
    t.add_argument("--dry-run", action="store_true",
                   help="validate and resolve the config, print the plan (models, hook, sizes, tokens, "
                        "disk and memory estimates); load nothing")
    t.add_argument("--resume", metavar="DIR",
                   help="continue the run checkpointed in DIR (a checkpoint, or a run's checkpoint folder: "
                        "the newest one is used); its saved config is used, flags override it")
    t.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    t.add_argument("--help-config", action="store_true", help="list every config flag and exit")

    h = sub.add_parser("harvest", help="harvest a paired activation cache for a config's cache_path",
                       description="Run both models over the config's dataset and write the hook's paired "
                                   "activations to cache_path (resumable). `train` then reads the cache.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("--config", "-c", metavar="FILE", required=True, help="YAML or JSON run config")
    h.add_argument("--cache-path", metavar="DIR", help="override cache_path")
    h.add_argument("--overwrite", action="store_true", help="start again even if DIR holds a cache")

    u = sub.add_parser("upload", help="upload trained dictionaries to the Hugging Face Hub",
                       description="Upload a training output folder with SAELens's upload_saes_to_huggingface. "
                                   "Load it back with SAE.from_pretrained(REPO_ID, SAE_ID) after `import sae_diff`.")
    u.add_argument("paths", nargs="+", metavar="DIR", help="output folder(s) holding cfg.json + sae_weights.safetensors")
    u.add_argument("--repo-id", required=True, help="Hub repository, e.g. my-org/gemma2-crosscoders")
    u.add_argument("--sae-id", action="append", metavar="ID",
                   help="folder name in the repo, once per DIR (default: the DIR's name)")
    u.add_argument("--revision", default="main", help="branch to commit to (default: main)")
    u.add_argument("--private", action="store_true", help="create the repository as private")
    u.add_argument("--metadata", action="append", metavar="KEY=VALUE", default=[],
                   help="add or override a cfg.metadata field (e.g. base_model_name=google/gemma-2-2b)")
    u.add_argument("--no-readme", action="store_true", help="do not write README.md")

    for name, helptext in (("organism", "build the bundled tiny model-organism pair (sae_diff.organisms)"),
                           ("demo", "run the end-to-end demo study (sae_diff.report.demo)")):
        sub.add_parser(name, help=helptext, add_help=False)  # handled in main(): argv passed through
    return p


# ---------------------------------------------------------------------- commands
def _print_plan(cfg: Any, as_json: bool) -> None:
    from sae_diff.training.config import make_plan

    plan = make_plan(cfg)
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print("Plan (dry run: nothing was loaded)")
        print(plan.render())


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from sae_diff.training.config import parse_config

    if args.help_config:
        from sae_diff.training.config import config_flags_help

        print(config_flags_help(args.config, args.architecture))
        return 0
    if args.resume:
        from sae_diff.training.runner import PairedSAETrainingRunner, find_checkpoint

        ckpt = find_checkpoint(args.resume)
        cfg = parse_config(ckpt / "runner_cfg.json", rest, architecture=args.architecture, keep_checkpoint_path=True)
        cfg.resume_from_checkpoint = str(ckpt)
        if args.dry_run:
            print(f"Would resume from {ckpt}")
            _print_plan(cfg, args.json)
            return 0
        print(f"Resuming from {ckpt}")
        runner = PairedSAETrainingRunner(cfg)
    else:
        if args.config is None and args.architecture is None:
            print("sae-diff train: give --config FILE (or --architecture NAME and flags). "
                  "See `sae-diff train --help`.", file=sys.stderr)
            return 2
        cfg = parse_config(args.config, rest, architecture=args.architecture)
        if args.dry_run:
            _print_plan(cfg, args.json)
            return 0
        from sae_diff.training.runner import PairedSAETrainingRunner

        runner = PairedSAETrainingRunner(cfg)
    from sae_diff.training.runner import TrainingInterrupted

    try:
        runner.run()
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    _print_summary(runner)
    return 0


def _print_summary(runner: Any) -> None:
    cfg = runner.cfg
    print(f"Trained {cfg.architecture} on {cfg.store_mode} activations at {cfg.hook_name}.")
    for k, v in runner.eval_metrics.items():
        print(f"  {k:60s} {v:.4g}" if isinstance(v, float) else f"  {k:60s} {v}")
    if cfg.output_path:
        print(f"Saved to {cfg.output_path} (load with SAE.load_from_disk after `import sae_diff`).")


def cmd_harvest(args: argparse.Namespace, rest: list[str]) -> int:
    from sae_diff.training.config import parse_config
    from sae_diff.training.data import harvest

    if args.cache_path:
        rest = [*rest, "--cache_path", args.cache_path]
    cfg = parse_config(args.config, rest)
    if cfg.cache_path is None:
        print("sae-diff harvest: the config has no cache_path; set it or pass --cache-path DIR.", file=sys.stderr)
        return 2
    summary = harvest(cfg, overwrite=args.overwrite)
    print(summary)
    return 0


def cmd_upload(args: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from sae_diff.hub import upload_dictionaries

    if rest:
        print(f"sae-diff upload: unrecognised arguments {rest}", file=sys.stderr)
        return 2
    ids = args.sae_id or [Path(p).resolve().name for p in args.paths]
    if len(ids) != len(args.paths):
        print("sae-diff upload: give one --sae-id per folder (or none).", file=sys.stderr)
        return 2
    metadata: dict[str, Any] = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"sae-diff upload: --metadata expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        metadata[key] = value
    url = upload_dictionaries(dict(zip(ids, args.paths)), args.repo_id, revision=args.revision,
                              private=args.private, metadata=metadata or None, readme=not args.no_readme)
    print(f"Uploaded {len(ids)} dictionar{'y' if len(ids) == 1 else 'ies'} to {url}")
    for sae_id in ids:
        print(f'  SAE.from_pretrained("{args.repo_id}", "{sae_id}")')
    return 0


def _delegate(module: str, argv: list[str], what: str) -> int:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if e.name and not module.startswith(e.name) and e.name != module:
            raise
        print(f"sae-diff: the {what} is not available in this installation ({module} is missing).",
              file=sys.stderr)
        return 2
    main = getattr(mod, "main", None)
    if main is None:
        print(f"sae-diff: {module} has no main(argv).", file=sys.stderr)
        return 2
    return int(main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-diff`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "organism":
        return _delegate("sae_diff.organisms.build", argv[1:], "organism builder")
    if argv and argv[0] == "demo":
        return _delegate("sae_diff.report.demo", argv[1:], "demo pipeline")
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from sae_diff.training.config import ConfigError
    from sae_diff.training.data import TrainingDataError

    handlers = {"train": cmd_train, "harvest": cmd_harvest, "upload": cmd_upload}
    try:
        return handlers[args.command](args, rest)
    except (ConfigError, TrainingDataError, FileNotFoundError) as e:
        print(f"sae-diff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
