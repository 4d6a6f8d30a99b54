"""The ``sae-diff`` argument parser: the one ``--help`` surface of every subcommand.

Only the parser: what each subcommand does is in :mod:`sae_diff.commands.handlers`, the entry
point and its exit statuses in :mod:`sae_diff.cli`. Subcommands that belong to another module
(``organism``, ``demo``, ``stagewise``, ``causal-filter``) are listed here for ``--help`` and
receive their arguments untouched.
"""

from __future__ import annotations

import argparse

from sae_diff import __version__

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


def build_parser() -> argparse.ArgumentParser:
    """The ``sae-diff`` parser (``train``, ``harvest``, ``upload`` parsed here; the other
    subcommands only named, their argv passed through by :func:`sae_diff.cli.main`)."""
    p = argparse.ArgumentParser(
        prog="sae-diff",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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


__all__ = ["DESCRIPTION", "EPILOG", "TRAIN_EPILOG", "build_parser"]
