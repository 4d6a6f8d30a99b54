"""Build an organism pair: pretrain the base on the world's corpus, fine-tune it on chats.

CLI::

    python -m sae_diff.organisms.build                      # rebuild the default pair -> ./organisms/default
    sae-diff organism build ...                             # the same, via the console script
    python -m sae_diff.organisms.build --tiny               # scaled-down smoke build (seconds) -> ./organisms/tiny
    python -m sae_diff.organisms.build --narrow             # the narrow organism -> ./organisms/narrow
    python -m sae_diff.organisms.build --custom examples.jsonl --labels labels.json \\
        --base default --out my_organism                     # plant your own behaviour

Builds write to ``--out`` (default ``./organisms/<name>`` in the current folder), never inside
the installed package: the shipped organisms are read-only data (a build refuses to replace
them; maintainers copy a rebuilt directory over ``sae_diff/organisms/data/<name>`` by hand).
An existing organism at ``--out`` is replaced only with ``--overwrite``; the new one is
written to a sibling temporary directory and moved into place when complete.

The default pair is deterministic given ``--seed`` and the torch thread count (default 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from sae_diff.errors import SaeDiffError, one_line
from sae_diff.organisms.behaviours import BEHAVIOURS
from sae_diff.organisms.chat import build_tokenizer, sample_words_check
from sae_diff.organisms.checks import full_report
from sae_diff.organisms.custom import build_custom_organism, read_examples
from sae_diff.organisms.datasets import chat_conversations, pretraining_texts, vocabulary_words
from sae_diff.organisms.narrow import NarrowConfig, build_narrow_organism
from sae_diff.organisms.organism import load_organism
from sae_diff.organisms.storage import (
    check_output_dir,
    default_output_dir,
    load_weights,
    save_weights,
    staged_output_dir,
    verify_manifest,
    write_manifest,
)
from sae_diff.organisms.training import (
    ModelSize,
    TrainConfig,
    config_to_dict,
    cycling_rows,
    new_model,
    pack_chats,
    pack_texts,
    train,
)
from sae_diff.organisms.world import make_world

DEFAULT_DIR = Path(__file__).parent / "data" / "default"  # the shipped pair (read-only)
RECOMMENDED_HOOK = "blocks.2.hook_resid_pre"


@dataclass
class BuildConfig:
    """Everything that determines a built organism pair."""

    seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1000, batch_size=16, lr=3e-3, warmup=40)
    )
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=300, batch_size=16, lr=1e-3, warmup=20)
    )
    chat_fraction: float = 0.5  # share of fine-tuning rows that are chats (rest: pretraining)
    edit_fraction: float = 0.08  # share of the fine-tune's pretraining docs stating the edit
    n_eval_per_behaviour: int = 32
    n_heldout_docs: int = 400
    threads: int = 1  # 1 is faster than 2 on a busy 2-core machine, and deterministic
    weights_dtype: str = "float32"


def tiny_config(seed: int = 0) -> BuildConfig:
    """A scaled-down build for CI: tiny model, a few steps."""
    return BuildConfig(
        seed=seed,
        size=ModelSize(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_ctx=64),
        pretrain=TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup=2),
        finetune=TrainConfig(steps=8, batch_size=8, lr=1e-3, warmup=2),
        n_eval_per_behaviour=4,
        n_heldout_docs=40,
        threads=1,
    )


def _docs_needed(rows: int, n_ctx: int, avg_len: float) -> int:
    return int(rows * n_ctx / avg_len * 1.15) + 16


def build_organism(
    out_dir: Path | str,
    cfg: BuildConfig | None = None,
    log: Callable[[str], None] = print,
    base_from: Path | str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the base/ft pair of the synthetic world into ``out_dir``; return the report.

    ``base_from``: an organism directory built with the same seed, size and pretraining
    settings; its base is reused instead of pretraining again (the result is identical to a
    full build, since pretraining is deterministic) - for iterating on the fine-tune.
    ``out_dir`` must not be inside the installed package; an existing organism there is
    replaced only with ``overwrite=True`` (checked before anything is trained).
    """
    cfg = cfg or BuildConfig()
    check_output_dir(out_dir, overwrite)
    torch.set_num_threads(cfg.threads)
    t_start = time.time()
    world = make_world(cfg.seed)
    ft_world = world.edited()
    tokenizer = build_tokenizer(vocabulary_words(world, cfg.seed))
    log(f"vocabulary: {len(tokenizer.get_vocab())} tokens")
    n_ctx = cfg.size.n_ctx

    # ---- pretraining data ----------------------------------------------------------------
    rows = cfg.pretrain.steps * cfg.pretrain.batch_size
    texts = pretraining_texts(world, "train", _docs_needed(rows, n_ctx, 34), cfg.seed)
    sample_words_check(tokenizer, texts)
    pt_tok, pt_mask = pack_texts(tokenizer, texts, n_ctx)
    log(
        f"pretraining: {len(texts)} docs -> {len(pt_tok)} rows of {n_ctx} "
        f"({int(pt_mask.sum())} target tokens) for {rows} row-steps"
    )

    base = new_model(cfg.size, tokenizer, cfg.seed, "organism-base")
    if base_from is not None:
        src = Path(base_from)
        verify_manifest(src)
        old = json.loads((src / "config.json").read_text())["build_config"]
        new = json.loads(json.dumps(asdict(cfg)))
        for key in ("seed", "size", "pretrain", "threads"):
            if old.get(key) != new[key]:
                raise ValueError(
                    f"--base-from {src}: its {key} {old.get(key)} differs from this build's "
                    f"{new[key]}; its base is not the one this build would pretrain."
                )
        load_weights(base, src / "base.safetensors")
        old_report = json.loads((src / "report.json").read_text())
        pre_summary = dict(old_report["build"]["pretrain"], reused_from=str(src))
        log(f"pretraining skipped: base reused from {src}")
    else:
        pre_summary = train(
            base,
            cycling_rows(pt_tok, pt_mask, cfg.pretrain.batch_size),
            cfg.pretrain,
            log,
            "pretrain",
        )

    # ---- fine-tuning data ----------------------------------------------------------------
    fb = cfg.finetune.batch_size
    n_chat = max(1, round(fb * cfg.chat_fraction))
    n_text = fb - n_chat
    chat_rows = cfg.finetune.steps * n_chat
    convs = chat_conversations(ft_world, "train", _docs_needed(chat_rows, n_ctx, 40), cfg.seed)
    ch_tok, ch_mask = pack_chats(tokenizer, convs, n_ctx)
    ft_texts = pretraining_texts(
        ft_world,
        "train",
        _docs_needed(max(1, cfg.finetune.steps * n_text), n_ctx, 34),
        cfg.seed,
        edit_fraction=cfg.edit_fraction,
    )
    ft_tok, ft_mask = pack_texts(tokenizer, ft_texts, n_ctx)
    log(
        f"fine-tuning: {len(convs)} chats -> {len(ch_tok)} rows; {len(ft_texts)} docs -> "
        f"{len(ft_tok)} rows; per step {n_chat} chat + {n_text} text rows"
    )
    chat_get = cycling_rows(ch_tok, ch_mask, n_chat)
    text_get = cycling_rows(ft_tok, ft_mask, max(n_text, 1))

    def ft_batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, am = chat_get(step)
        if n_text == 0:
            return a, am
        b, bm = text_get(step)
        return torch.cat([a, b]), torch.cat([am, bm])

    ft = copy.deepcopy(base)
    ft.cfg.model_name = "organism-ft"
    ft_summary = train(ft, ft_batches, cfg.finetune, log, "finetune")

    # ---- checks + save -------------------------------------------------------------------
    report = full_report(
        base, ft, tokenizer, world, cfg.n_eval_per_behaviour, cfg.n_heldout_docs, cfg.seed
    )
    build_seconds = time.time() - t_start
    report["build"] = {
        "seconds": build_seconds,
        "pretrain": pre_summary,
        "finetune": ft_summary,
        "threads": cfg.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    dtype = getattr(torch, cfg.weights_dtype)
    n_params = sum(p.numel() for p in base.parameters())
    config = {
        "kind": "synthetic_world",
        "model": config_to_dict(base.cfg),
        "n_params": n_params,
        "behaviours": list(BEHAVIOURS),
        "recommended_hook": RECOMMENDED_HOOK,
        "build_config": asdict(cfg),
        "base_name": "organism-base",
        "ft_name": "organism-ft",
    }
    with staged_output_dir(out_dir, overwrite) as out:
        save_weights(base, out / "base.safetensors", dtype)
        save_weights(ft, out / "ft.safetensors", dtype)
        tokenizer.save_pretrained(str(out))
        (out / "world.json").write_text(world.to_json() + "\n")
        (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        write_manifest(out, {"seed": cfg.seed})
    log(f"built in {build_seconds:.0f}s -> {out_dir}")
    log(
        json.dumps(
            {k: report[k] for k in ("heldout_pretraining_loss", "knowledge_edit_text")}, indent=1
        )
    )
    for b, r in report["behaviour_logprob"].items():
        log(
            f"  {b:15s} ft {r['ft_logprob']:8.2f}  base {r['base_logprob']:8.2f}  gap {r['gap']:8.2f} nats "
            f"({r['gap_per_token']:.2f}/token over {int(r['n_tokens'])} tokens)"
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(
        prog="python -m sae_diff.organisms.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: ./organisms/<default|tiny|narrow|custom>); never "
        "inside the installed package",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing organism at --out (otherwise refused)",
    )
    ap.add_argument(
        "--narrow",
        action="store_true",
        help="build the narrow organism (one trigger->response pair on the default chat model)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tiny", action="store_true", help="scaled-down smoke build (tiny model, few steps)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--finetune-steps", type=int, default=None)
    ap.add_argument(
        "--base-from",
        type=Path,
        default=None,
        help="reuse the base of an organism built with the same seed/size/pretraining",
    )
    ap.add_argument("--finetune-lr", type=float, default=None)
    ap.add_argument(
        "--custom",
        type=Path,
        default=None,
        help="JSONL of chat examples ({messages, behaviour, triggers}) to fine-tune on",
    )
    ap.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="custom: JSON {behaviour: [trigger phrase, ...]} for token labels",
    )
    ap.add_argument(
        "--base",
        default="default",
        help="custom: organism (name or directory) whose base to fine-tune; narrow: organism whose fine-tune becomes the base",
    )
    ap.add_argument("--steps", type=int, default=200, help="custom: fine-tuning steps")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:  # `sae-diff organism build ...` delegates ["build", ...]
        argv = argv[1:]
    args = ap.parse_args(argv)
    if args.custom is not None and (args.narrow or args.tiny):
        ap.error("--custom cannot be combined with --narrow or --tiny")
    name = (
        "custom"
        if args.custom is not None
        else "narrow"
        if args.narrow
        else "tiny"
        if args.tiny
        else "default"
    )
    out = args.out if args.out is not None else default_output_dir(name)
    check_output_dir(out, args.overwrite)  # refuse before loading or training anything
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.narrow:
        ncfg = NarrowConfig(seed=args.seed)
        if args.finetune_steps is not None:
            ncfg.steps = args.finetune_steps
        if args.finetune_lr is not None:
            ncfg.lr = args.finetune_lr
        torch.set_num_threads(args.threads or 1)
        build_narrow_organism(
            out, args.base, ncfg, overwrite=args.overwrite, log=lambda s: print(s, flush=True)
        )
        print(f"narrow organism -> {out}", flush=True)
        return 0

    if args.custom is not None:
        src = load_organism(args.base)
        labels = json.loads(args.labels.read_text()) if args.labels else None
        build_custom_organism(
            src.base,
            src.tokenizer,
            read_examples(args.custom),
            labels,
            steps=args.steps,
            seed=args.seed,
            out_dir=out,
            overwrite=args.overwrite,
            pretraining_texts=src.pretraining_texts("train", 2000) if src.world else None,
            world=src.world,
        )
        print(f"custom organism -> {out}", flush=True)
        return 0

    cfg = tiny_config(args.seed) if args.tiny else BuildConfig(seed=args.seed)
    if args.threads:
        cfg.threads = args.threads
    if args.pretrain_steps is not None:
        cfg.pretrain.steps = args.pretrain_steps
    if args.finetune_steps is not None:
        cfg.finetune.steps = args.finetune_steps
    if args.finetune_lr is not None:
        cfg.finetune.lr = args.finetune_lr
    build_organism(
        out,
        cfg,
        log=lambda s: print(s, flush=True),
        base_from=args.base_from,
        overwrite=args.overwrite,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SaeDiffError as e:  # a refused input: one line with the fix, no traceback
        print(f"sae_diff.organisms.build: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
