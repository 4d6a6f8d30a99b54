"""``sae-diff``: the command line of sae_diff (thin: parse, then call the library).

Subcommands: ``harvest``, ``train``, ``upload``, ``organism``, ``demo``, ``stagewise``,
``causal-filter``. Run
``sae-diff <command> --help`` for each; ``docs/training.md`` has the full story.

Errors: every deliberate library error is a :class:`sae_diff.errors.SaeDiffError`; the CLI
prints it as one line (what, why, the fix) on stderr and exits with status 2
(``--traceback`` prints the traceback too). Ctrl-C exits with status 130 and one line saying
how to resume. Bad input is checked before any model is loaded where possible (datasets,
the cache's identity, a resumed run's config); see ``docs/reliability.md``.

Length (~550 lines): one thin parser + call per subcommand; splitting would scatter the one
``--help`` surface.
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
  sae-diff train --resume checkpoints/my_run            # continue: the config's checkpoint_path
                                                        # (its latest run), a run or a checkpoint
  sae-diff harvest --config my.yaml                     # fill cache_path first
  sae-diff --traceback train --config my.yaml           # full traceback on errors
  sae-diff upload output/ --repo-id me/gemma2-crosscoders --sae-id l13-batchtopk
  sae-diff stagewise --config configs/analysis/stagewise_organism.yaml
  sae-diff causal-filter --config configs/analysis/causal_filter_organism.yaml
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
    p = argparse.ArgumentParser(
        prog="sae-diff",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from sae_diff import __version__

    p.add_argument("--version", action="version", version=f"sae-diff {__version__}")
    p.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, print the full traceback (also accepted after the command)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a crosscoder / diff-SAE / SAE from a config",
        description="Train a dictionary on a model pair with SAELens's SAETrainer.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--config", "-c", metavar="FILE", help="YAML or JSON run config")
    t.add_argument(
        "--architecture",
        metavar="NAME",
        help="override sae.architecture (crosscoder, batchtopk_crosscoder, batchtopk_diff_sae, "
        "or any SAELens architecture such as batchtopk)",
    )
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and resolve the config, print the plan (models, hook, sizes, tokens, "
        "disk and memory estimates); load nothing",
    )
    t.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run checkpointed in DIR: the config's checkpoint_path (its latest run), "
        "one run's folder in it, or one checkpoint (the newest is used). Its saved config "
        "is used; flags may change where it runs (device, output_path, ...), not what it learns",
    )
    t.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    t.add_argument("--help-config", action="store_true", help="list every config flag and exit")

    h = sub.add_parser(
        "harvest",
        help="harvest a paired activation cache for a config's cache_path",
        description="Run both models over the config's dataset and write the hook's paired "
        "activations to cache_path (resumable). `train` then reads the cache.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    h.add_argument("--config", "-c", metavar="FILE", required=True, help="YAML or JSON run config")
    h.add_argument("--cache-path", metavar="DIR", help="override cache_path")
    h.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the cache in DIR and harvest it again (the only way a cache is replaced; "
        "without it an unfinished cache is resumed and a different one is refused)",
    )

    u = sub.add_parser(
        "upload",
        help="upload trained dictionaries to the Hugging Face Hub",
        description="Upload a training output folder with SAELens's upload_saes_to_huggingface. "
        "Load it back with SAE.from_pretrained(REPO_ID, SAE_ID) after `import sae_diff`.",
    )
    u.add_argument(
        "paths",
        nargs="+",
        metavar="DIR",
        help="output folder(s) holding cfg.json + sae_weights.safetensors",
    )
    u.add_argument(
        "--repo-id", required=True, help="Hub repository, e.g. my-org/gemma2-crosscoders"
    )
    u.add_argument(
        "--sae-id",
        action="append",
        metavar="ID",
        help="folder name in the repo, once per DIR (default: the DIR's name)",
    )
    u.add_argument("--revision", default="main", help="branch to commit to (default: main)")
    u.add_argument("--private", action="store_true", help="create the repository as private")
    u.add_argument(
        "--metadata",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="add or override a cfg.metadata field (e.g. base_model_name=google/gemma-2-2b)",
    )
    u.add_argument("--no-readme", action="store_true", help="do not write README.md")

    for name, helptext in (
        ("organism", "build the bundled tiny model-organism pair (sae_diff.organisms)"),
        ("demo", "run the end-to-end demo study (sae_diff.report.demo)"),
        ("stagewise", "stage-wise model diffing from a config (sae_diff.analysis.stagewise)"),
        (
            "causal-filter",
            "base-SAE diffing with a causal filter from a config (sae_diff.analysis.causal_filter)",
        ),
    ):
        sub.add_parser(
            name, help=helptext, add_help=False
        )  # handled in main(): argv passed through
    return p


# ---------------------------------------------------------------------- commands
def _print_plan(cfg: Any, as_json: bool) -> None:
    from sae_diff.training.plan import make_plan

    plan = make_plan(cfg)
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print("Plan (dry run: nothing was loaded)")
        print(plan.render())


# ---------------------------------------------------------------------- checks before loading
def preflight_datasets(cfg: Any) -> None:
    """Check the run's local datasets before any model is loaded: they exist, are data files
    or saved datasets (not a folder of files), hold rows, and not only empty texts.

    Hub datasets are not checked here (that needs the network); the runner peeks at them.

    Raises:
        TrainingDataError: naming the dataset, what is wrong and the fix.
    """
    from pathlib import Path

    from sae_diff.training.data import TrainingDataError

    specs: list[dict[str, Any]] = list(cfg.dataset_mixture or [])
    if cfg.dataset_path and not specs:
        specs = [
            {"path": cfg.dataset_path, "column": cfg.dataset_column, "split": cfg.dataset_split}
        ]
    for spec in specs:
        path = Path(str(spec.get("path", ""))).expanduser()
        if not path.exists():
            continue  # a Hub id, or missing: the reader's own message names it
        if path.is_dir():
            if (
                (path / "dataset_info.json").exists()
                or (path / "state.json").exists()
                or (path / "dataset_dict.json").exists()
            ):
                _check_rows(path, spec, saved=True)
                continue
            files = sorted(
                p.name
                for p in path.iterdir()
                if p.suffix in (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")
            )
            raise TrainingDataError(
                f"dataset {str(path)!r} is a folder of data files ({', '.join(files[:4])}"
                f"{', ...' if len(files) > 4 else ''}), not a saved dataset (no dataset_info.json). "
                "Pass one file as dataset_path, or list each file in dataset_mixture "
                "(- {path: FILE, weight: 1}); a folder is read only when written by Dataset.save_to_disk."
                if files
                else f"dataset {str(path)!r} is an empty folder or holds no data files; give a .jsonl/.json/"
                ".parquet/.csv/.txt file or a folder written by Dataset.save_to_disk."
            )
        if path.stat().st_size == 0 or not path.read_bytes()[: 1 << 16].strip():
            raise TrainingDataError(
                f"dataset file {str(path)!r} is empty (no rows). Point dataset_path at a file with data."
            )
        _check_rows(path, spec, saved=False)


def _check_rows(path: Any, spec: dict[str, Any], saved: bool) -> None:
    """At least one row, and at least one non-empty text in the text column (read until the
    first one: cheap when the data is fine)."""
    from sae_diff.data.sources import DatasetSpec, load_rows
    from sae_diff.training.data import TrainingDataError

    keys = ("path", "column", "split", "name", "revision", "start", "stop")
    ds_spec = DatasetSpec(**{k: v for k, v in spec.items() if k in keys and v is not None})
    try:
        rows = iter(load_rows(ds_spec))
        first = next(rows, None)
    except Exception as e:  # datasets raises StopIteration/IndexError/ArrowInvalid on bad files
        if saved and _saved_rows(path) == 0:  # datasets cannot even open an empty saved dataset
            first = None
        else:
            raise TrainingDataError(
                f"dataset {str(path)!r} cannot be read ({type(e).__name__}: {e}"
                f"{f'; {type(e.__cause__).__name__}: {e.__cause__}' if e.__cause__ else ''}). Check that it is a valid "
                f"{'saved dataset' if saved else path.suffix + ' file'} with one record per row."
            ) from e
    if first is None:
        raise TrainingDataError(
            f"{'saved dataset' if saved else 'dataset file'} {str(path)!r} (split {ds_spec.split!r}) has no "
            "rows. Point dataset_path at data."
        )
    column = ds_spec.column or next(
        (c for c in ("text", "content", "document") if c in first), None
    )
    if column is None or not isinstance(first.get(column), str):
        return  # tokens or chat data: nothing more to check cheaply
    n = 0
    for row in _chain(first, rows):
        n += 1
        if str(row.get(column) or "").strip():
            return
    raise TrainingDataError(
        f"dataset {str(path)!r}: all {n} texts in column {column!r} are empty, so there is nothing to "
        "tokenize. Check the column (dataset_column) or the file."
    )


def _saved_rows(path: Any) -> int | None:
    """Rows in the Arrow files of a ``save_to_disk`` folder (None if they cannot be read)."""
    try:
        import pyarrow as pa

        return sum(pa.ipc.open_stream(str(f)).read_all().num_rows for f in path.rglob("*.arrow"))
    except Exception:
        return None


def _chain(first: Any, rest: Any) -> Any:
    yield first
    yield from rest


def preflight_cache(cfg: Any, *, what: str = "the config") -> None:
    """:func:`sae_diff.data.cache.check_config_cache` before anything loads (models unknown:
    names, data, hook, masks, dtype and context size are compared; hashes once loaded)."""
    from sae_diff.data.cache import check_config_cache

    check_config_cache(cfg, what=what)


# ---------------------------------------------------------------------- commands
#: multi-run analyses a config names with a top-level ``method:``; ``sae-diff train`` and their
#: own subcommands hand such a config to the module's ``main`` (module, what, subcommand)
ANALYSIS_METHODS: dict[str, tuple[str, str]] = {
    "stagewise": ("sae_diff.analysis.stagewise", "stage-wise diffing"),
    "causal_filter": ("sae_diff.analysis.causal_filter", "causal filter"),
}


def analysis_method(path: Any) -> str | None:
    """The config's ``method:`` when it names one of :data:`ANALYSIS_METHODS` (else None:
    a training config). Unreadable files are left to the training config's own errors."""
    from sae_diff.training.config import read_config_file

    try:
        data = read_config_file(path)
    except Exception:
        return None
    method = data.get("method") if isinstance(data, dict) else None
    return method if method in ANALYSIS_METHODS else None


def parse_config(path: Any, rest: list[str], **kwargs: Any) -> Any:
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
            return _delegate(module, ["--config", str(args.config), *rest], what)
        cfg = parse_config(args.config, rest, architecture=args.architecture)
        preflight_datasets(cfg)
        preflight_cache(cfg)
        if args.dry_run:
            _print_plan(cfg, args.json)
            return 0
        from sae_diff.training.runner import PairedSAETrainingRunner

        runner = PairedSAETrainingRunner(cfg)
    from sae_diff.training.runner import TrainingInterrupted

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


def _train_resume_hint(args: argparse.Namespace, cfg: Any) -> str:
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


def _print_summary(runner: Any) -> None:
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
    from pathlib import Path

    from sae_diff.hub import upload_dictionaries

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


def _delegate(module: str, argv: list[str], what: str) -> int:
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


def _report(command: str, err: BaseException, traceback: bool) -> int:
    """Print a library error as one line (and the traceback when asked); exit status 2."""
    from sae_diff.errors import one_line

    if traceback:
        import traceback as tb

        tb.print_exception(err)
    print(f"sae-diff {command}: error: {one_line(err)}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-diff`` console script.

    Exit status: 0 success, 2 a library error (printed as one line), 130 interrupted."""
    from sae_diff.errors import SaeDiffError

    argv = list(sys.argv[1:] if argv is None else argv)
    show_tb = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    command = argv[0] if argv else ""
    try:
        if command == "organism":
            return _delegate("sae_diff.organisms.build", argv[1:], "organism builder")
        if command == "demo":
            return _delegate("sae_diff.report.demo", argv[1:], "demo pipeline")
        if command in ("stagewise", "causal-filter"):
            module, what = ANALYSIS_METHODS[command.replace("-", "_")]
            return _delegate(module, argv[1:], what)
        parser = _parser()
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        handlers = {"train": cmd_train, "harvest": cmd_harvest, "upload": cmd_upload}
        return handlers[args.command](args, rest)
    except (SaeDiffError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        return _report(command, e, show_tb)
    except KeyboardInterrupt:
        print(f"sae-diff {command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
