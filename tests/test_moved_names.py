"""Names that moved (issue 15's splits) keep working from their old modules for one release.

The tables below are the record of what moved where. ``ALIASED``: names the old module no
longer uses, resolved through ``sae_diff.moved.moved_names`` (the same object, with a
``DeprecationWarning`` naming the new module). ``REEXPORTED``: names the old module still uses
itself, so a plain import keeps them (no warning). The tests also check that ``ALIASED`` is
exactly the package's alias tables (an alias cannot be dropped or added unrecorded), and that
the library and the benchmarks never import through an alias (function-level imports
included): an alias is for users' code only.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import warnings
from pathlib import Path

import pytest

import sae_diff

ROOT = Path(__file__).resolve().parents[1]

#: (old module, new module) -> names resolved through a deprecation alias
ALIASED: dict[tuple[str, str], tuple[str, ...]] = {
    ("sae_diff.analysis.examples", "sae_diff.analysis.example_display"): (
        "examples_html",
        "save_examples_html",
    ),
    ("sae_diff.analysis.examples", "sae_diff.analysis.token_text"): ("decode_text",),
    ("sae_diff.analysis.latent_scaling", "sae_diff.analysis.latent_scaling_reference"): (
        "latent_scaling_cost_ratio",
        "latent_scaling_naive",
    ),
    ("sae_diff.analysis.latent_scaling", "sae_diff.analysis.latent_scaling_result"): ("MODELS",),
    ("sae_diff.analysis.stagewise", "sae_diff.analysis.stages"): (
        "DATA",
        "MODELS",
        "copy_sae",
        "firing_frequency",
        "rotation_table",
        "top_rotating",
    ),
    ("sae_diff.cli", "sae_diff.commands.handlers"): ("analysis_method", "parse_config"),
    ("sae_diff.cli", "sae_diff.commands.parser"): ("DESCRIPTION", "EPILOG", "TRAIN_EPILOG"),
    ("sae_diff.cli", "sae_diff.commands.preflight"): ("preflight_cache", "preflight_datasets"),
    ("sae_diff.data.cache", "sae_diff.data.harvest"): ("harvest_cache",),
    ("sae_diff.data.harvest", "sae_diff.data.cache_manifest"): ("commit_sharded_manifest",),
    ("sae_diff.data.sources", "sae_diff.data.documents"): (
        "CHAT_COLUMNS",
        "Kind",
        "TEXT_COLUMNS",
        "TOKEN_COLUMNS",
        "iter_documents",
        "render_chat",
    ),
    ("sae_diff.data.sources", "sae_diff.data.token_batch"): ("BATCH_FIELDS",),
    ("sae_diff.data.store", "sae_diff.data.shards"): ("_shard_batches", "indexed_model_shards"),
    ("sae_diff.evaluation.patching", "sae_diff.evaluation.engine"): ("PatchMetrics",),
    ("sae_diff.organisms.behaviours", "sae_diff.organisms.detectors"): (
        "MODEL",
        "Segments",
        "TEMPLATE",
        "TEXT",
        "USER",
        "assistant_mask",
        "phrase_masks",
        "response_masks",
        "segment",
        "trigger_masks",
    ),
    ("sae_diff.organisms.organism", "sae_diff.organisms.ground_truth"): (
        "DATA_DIR",
        "assistant_mask",
        "available_organisms",
        "behaviour_masks",
        "chat_dataset",
        "load_tokenizer",
        "pretraining_dataset",
        "response_masks",
    ),
    ("sae_diff.report.demo", "sae_diff.report.base_sae_methods"): ("base_sae_methods",),
    ("sae_diff.report.demo", "sae_diff.report.inputs"): (
        "EvalSet",
        "evaluation_set",
        "harvest",
        "organism_info",
    ),
    ("sae_diff.report.demo", "sae_diff.report.methods"): (
        "ANALYSIS_METHODS",
        "BASELINES",
        "CORE_METHODS",
        "METHODS",
    ),
    ("sae_diff.report.demo", "sae_diff.report.output"): ("latent_dashboards", "make_figures"),
    ("sae_diff.report.demo", "sae_diff.report.scoreboard"): (
        "crosscoder_artefacts",
        "encode_tokens",
        "ft_specific_ranking",
        "method_rows",
        "nu_filter",
        "summarise_boards",
    ),
    ("sae_diff.report.demo", "sae_diff.report.training"): ("train_base_sae", "train_dictionary"),
    ("sae_diff.training.config", "sae_diff.training.flags"): ("config_flags_help", "parse_config"),
    ("sae_diff.training.config", "sae_diff.training.model_info"): (
        "KNOWN_MODEL_DIMS",
        "OrganismInfo",
        "check_hook_d_in",
        "known_model_dims",
        "model_config_dir",
        "organism_info",
    ),
    ("sae_diff.training.config", "sae_diff.training.plan"): (
        "BLOCK_HOOKS",
        "GLOBAL_HOOKS",
        "Plan",
        "check_hook_name",
        "make_plan",
        "preflight_checks",
    ),
    ("sae_diff.training.config", "sae_diff.training.validation"): (
        "DIFF_ARCHITECTURES",
        "check_organism",
    ),
    ("sae_diff.training.data", "sae_diff.training.tokens"): (
        "dataset_specs",
        "effective_prepend_bos",
        "organism_datasets",
        "smoke_test_tokens",
        "uses_organism_data",
    ),
    ("sae_diff.training.distributed", "sae_diff.training.data_parallel"): (
        "BUCKET_ELEMENTS",
        "DataParallel",
        "UNSUPPORTED_ARCHITECTURES",
    ),
    ("sae_diff.training.distributed", "sae_diff.training.global_topk"): (
        "MARGIN",
        "_TopKRecord",
        "_global_selection",
        "_offer",
        "global_batch_topk",
        "global_batch_topk_mask",
    ),
    ("sae_diff.training.runner", "sae_diff.training.trainer"): (
        "TrainingInterrupted",
        "use_fused_adam",
    ),
}

#: (old module, new module) -> names the old module still imports (plain re-exports)
REEXPORTED: dict[tuple[str, str], tuple[str, ...]] = {
    ("sae_diff.analysis.examples", "sae_diff.analysis.example_display"): ("LatentExamples",),
    ("sae_diff.analysis.examples", "sae_diff.analysis.token_text"): ("decode_pieces",),
    ("sae_diff.analysis.latent_scaling", "sae_diff.analysis.latent_scaling_result"): (
        "DEFAULT_MIN_COUNT",
        "LatentScalingResult",
    ),
    ("sae_diff.analysis.stagewise", "sae_diff.analysis.stages"): ("Stage", "run_stages"),
    ("sae_diff.analysis.stagewise", "sae_diff.analysis.plots"): ("rotation_figure",),
    ("sae_diff.analysis.stagewise", "sae_diff.analysis.config_file"): ("config_kwargs",),
    ("sae_diff.cli", "sae_diff.commands.handlers"): ("ANALYSIS_METHODS", "cmd_train"),
    ("sae_diff.data.cache", "sae_diff.data.cache_manifest"): ("rebuild_manifest",),
    ("sae_diff.data.harvest", "sae_diff.data.harvest_sharded"): ("harvest_cache_sharded",),
    ("sae_diff.data.harvest", "sae_diff.data.harvest_summary"): ("HarvestSummary",),
    ("sae_diff.data.sources", "sae_diff.data.documents"): (
        "DatasetSpec",
        "detect_kind",
        "load_rows",
    ),
    ("sae_diff.data.sources", "sae_diff.data.token_batch"): ("TokenBatch",),
    ("sae_diff.data.store", "sae_diff.data.shards"): (
        "DEFAULT_ROWS_PER_SHARD",
        "model_shards",
        "shard_keep",
    ),
    ("sae_diff.dictionaries.batchtopk_crosscoder", "sae_diff.dictionaries.topk"): (
        "BatchSelection",
        "batch_topk_mask",
    ),
    ("sae_diff.dictionaries.kernels", "sae_diff.dictionaries.optim"): ("make_adam",),
    ("sae_diff.dictionaries.kernels", "sae_diff.dictionaries.sparse_matmul"): (
        "_latent_bag_sum",
        "offsets_from_sorted",
    ),
    ("sae_diff.evaluation.patching", "sae_diff.evaluation.engine"): ("evaluate_interventions",),
    ("sae_diff.organisms.organism", "sae_diff.organisms.ground_truth"): ("organism_dir",),
    ("sae_diff.organisms.organism", "sae_diff.organisms.scoring"): (
        "EvalConversation",
        "ScoringSet",
        "pad_conversations",
    ),
    ("sae_diff.pairing.masks", "sae_diff.pairing.chat_masks"): (
        "ChatMarkers",
        "assistant_mask",
        "encode_chat",
    ),
    ("sae_diff.pairing.masks", "sae_diff.pairing.token_masks"): (
        "high_norm_mask",
        "special_ids_of",
    ),
    ("sae_diff.pairing.model", "sae_diff.pairing.backends"): ("is_bridge",),
    ("sae_diff.report.demo", "sae_diff.report.config"): ("DemoConfig",),
    ("sae_diff.report.demo", "sae_diff.report.study"): ("run_demo",),
    ("sae_diff.training.config", "sae_diff.training.validation"): (
        "BACKENDS",
        "STORE_MODES",
        "default_store_mode",
        "resolve_names",
        "validate_config",
    ),
    ("sae_diff.training.data", "sae_diff.training.tokens"): (
        "check_dataset_column",
        "run_token_rows",
        "token_source",
        "train_rows",
    ),
    ("sae_diff.training.data", "sae_diff.training.errors"): ("TrainingDataError",),
    ("sae_diff.training.runner", "sae_diff.training.trainer"): ("ResumableSAETrainer",),
    ("sae_diff.training.distributed", "sae_diff.process_group"): (
        "DistributedError",
        "World",
        "any_rank",
        "backend_for",
        "barrier",
        "comm_device",
        "init",
        "launched_by_torchrun",
        "local_device",
        "on_main",
        "shutdown",
        "world",
    ),
}


def _rows(table: dict[tuple[str, str], tuple[str, ...]]) -> list[tuple[str, str, str]]:
    return [(old, name, new) for (old, new), names in table.items() for name in names]


def _package_aliases() -> dict[tuple[str, str], str]:
    """``(old module, name) -> new module`` for every alias table in the package."""
    out: dict[tuple[str, str], str] = {}
    for info in pkgutil.walk_packages(sae_diff.__path__, "sae_diff."):
        module = importlib.import_module(info.name)
        moved = getattr(module.__dict__.get("__getattr__"), "moved", None)
        for name, target in (moved or {}).items():
            out[(info.name, name)] = target
    return out


PACKAGE_ALIASES = _package_aliases()


def test_the_record_is_the_package_s_alias_tables() -> None:
    assert {(old, name): new for old, name, new in _rows(ALIASED)} == PACKAGE_ALIASES


@pytest.mark.parametrize(("old", "name", "new"), _rows(ALIASED))
def test_aliased_name_warns_and_is_the_same_object(old: str, name: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize(("old", "name", "new"), _rows(REEXPORTED))
def test_reexported_name_is_the_same_object_without_warning(old: str, name: str, new: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old", sorted({old for old, _ in PACKAGE_ALIASES}))
def test_unknown_name_is_still_an_attribute_error(old: str) -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        importlib.import_module(old).no_such_name  # noqa: B018


def _imports_through_aliases(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = PACKAGE_ALIASES.get((node.module, alias.name))
                if target is not None:
                    found.append(
                        f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import "
                        f"{alias.name} (now in {target})"
                    )
    return found


def test_library_and_benchmarks_import_names_from_their_new_modules() -> None:
    files = sorted((ROOT / "sae_diff").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    found = [hit for path in files for hit in _imports_through_aliases(path)]
    assert not found, "\n".join(found)
