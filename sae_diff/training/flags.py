"""Command-line flags of ``sae-diff train``: a config file plus SAELens-style flags.

The flags are parsed the way SAELens's own runner parses them
(``sae_lens.llm_sae_training_runner._parse_cfg_args``, sae-lens 6.x): ``simple_parsing`` over a
twin of the config whose ``sae`` field is a ``subgroups`` choice keyed by SAELens's
``SAE_TRAINING_CLASS_REGISTRY`` (alias ``--architecture``), each choice a
``functools.partial`` of that architecture's ``TrainingSAEConfig``. Field names, help texts and
defaults are SAELens's own. Two things differ, both because a config *file* comes first here:

- each choice's partial carries the file's ``sae:`` values (SAELens's carries placeholder
  ``d_in`` / ``d_sae``), so the file's values are the flags' defaults, and the file's
  architecture is the subgroup's default;
- ``--architecture`` naming another architecture than the file's keeps the file's ``sae``
  fields the new one has and drops the rest with a warning (an unknown field is otherwise an
  error, with a "did you mean").

The parsed values are turned into the real config once, by
:func:`sae_diff.training.config.config_from_dict`, which validates them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings
from dataclasses import fields, make_dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAEConfig
from simple_parsing import ArgumentParser, subgroups

from sae_diff.training.config import (
    PairedRunnerConfig,
    _sae_config,
    config_from_dict,
    read_config_file,
)
from sae_diff.training.errors import ConfigError, did_you_mean

#: config fields that are not flags (derived by SAELens in ``__post_init__``)
_NOT_FLAGS = ("sae", "tokens_per_buffer")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _flags_dataclass(architecture: str, sae_values: dict[str, Any]) -> type:
    """The flag-parsing twin of :class:`PairedRunnerConfig`: ``sae`` is a subgroup over the
    training registry (default ``architecture``), each choice seeded with the ``sae_values``
    its class has; no ``__post_init__`` (the real config is built once, from the values)."""
    choices = {
        name: partial(
            cfg_cls, **{k: v for k, v in sae_values.items() if k in _field_names(cfg_cls)}
        )
        for name, (_, cfg_cls) in SAE_TRAINING_CLASS_REGISTRY.items()
    }
    return make_dataclass(
        "PairedRunnerFlags",
        [
            (
                "sae",
                TrainingSAEConfig,
                subgroups(choices, default=architecture, alias="--architecture"),  # type: ignore[arg-type]
            )
        ],
        bases=(PairedRunnerConfig,),
        namespace={"__post_init__": lambda self: None},
    )


def _flags_parser(
    architecture: str, sae_values: dict[str, Any], defaults: dict[str, Any], add_help: bool = False
) -> ArgumentParser:
    parser = ArgumentParser(prog="sae-diff train", add_help=add_help, exit_on_error=False)
    parser.add_arguments(_flags_dataclass(architecture, sae_values), dest="cfg")
    parser.set_defaults(cfg=defaults)
    return parser


def _architecture_flag(args: list[str]) -> str | None:
    """The value of an ``--architecture`` flag among ``args`` (the subgroup's alias)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--architecture", default=None)
    return pre.parse_known_args(args)[0].architecture


def _resolve(
    base: dict[str, Any], architecture: str | None, args: list[str]
) -> tuple[str, dict[str, Any]]:
    """The architecture (flag, else argument, else file) and the file's ``sae`` values for it;
    unknown architectures and fields are config errors (dropped, with a warning, when
    ``--architecture`` replaced the file's architecture)."""
    sae_values = dict(base.get("sae") or {})
    file_arch = sae_values.pop("architecture", None)
    sae_values.pop("metadata", None)  # a saved run's metadata: the runner rebuilds it
    arch = _architecture_flag(args) or architecture or file_arch
    if arch is None:
        raise ConfigError(
            "No architecture: give --architecture NAME or sae.architecture in the config file."
        )
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        _sae_config({"architecture": arch})  # raises the unknown-architecture error
    valid = _field_names(SAE_TRAINING_CLASS_REGISTRY[arch][1])
    extra = sorted(set(sae_values) - valid)
    if extra and file_arch is not None and file_arch != arch:
        warnings.warn(
            f"--architecture {arch} replaces {file_arch}: ignoring the file's sae fields {extra}, "
            f"which {arch} does not have.",
            stacklevel=3,
        )
        sae_values = {k: v for k, v in sae_values.items() if k not in extra}
    elif extra:
        hint = "".join(did_you_mean(u, valid, "sae.") for u in extra)
        raise ConfigError(
            f"Unknown field(s) {extra} for architecture {arch!r}{hint}; valid: {sorted(valid)}."
        )
    return arch, sae_values


def _runner_defaults(base: dict[str, Any]) -> dict[str, Any]:
    """The file's top-level values as flag defaults (unknown fields: the config's error)."""
    defaults = {k: v for k, v in base.items() if k not in _NOT_FLAGS}
    if set(defaults) - _field_names(PairedRunnerConfig):
        config_from_dict(base)  # raises, with "did you mean" hints
    if isinstance(defaults.get("seqpos_slice"), list):
        defaults["seqpos_slice"] = tuple(defaults["seqpos_slice"])
    return defaults


def parse_config(
    config_path: str | Path | None,
    args: list[str] | None = None,
    architecture: str | None = None,
    keep_checkpoint_path: bool = False,
) -> PairedRunnerConfig:
    """Build a config from a YAML/JSON file (optional) and SAELens-style flags.

    Flags override the file: ``--lr 1e-4 --k 64 --training_tokens 1_000_000`` (fields of the
    ``sae`` section use their own names, e.g. ``--d_sae``; where a name exists at both levels
    the sae one is ``--sae.dtype``). ``architecture`` (or an ``--architecture`` flag)
    overrides ``sae.architecture``. ``keep_checkpoint_path``: a saved run's config (no new
    run id).
    """
    args = list(args or [])
    base: dict[str, Any] = read_config_file(config_path) if config_path is not None else {}
    arch, sae_values = _resolve(base, architecture, args)
    parser = _flags_parser(arch, sae_values, _runner_defaults(base))
    try:
        ns, rest = parser.parse_known_args(args)
    except SystemExit as e:  # argparse errors exit; turn them into a config error
        raise ConfigError(f"Could not parse the flags {args}: see the message above.") from e
    except argparse.ArgumentError as e:  # a value outside a field's choices (e.g. --store_mode)
        raise ConfigError(f"Invalid flag value: {e}.") from e
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a dataclass rejected a flag's value (e.g. k > d_sae)
        raise ConfigError(f"Invalid flag value: {e}") from e
    if rest:
        known = sorted(_field_names(PairedRunnerConfig) | _field_names(type(ns.cfg.sae)))
        hint = "".join(
            did_you_mean(r.split("=")[0], known, "--") for r in rest if r.startswith("-")
        )
        raise ConfigError(
            f"Unrecognised flag(s) {rest}{hint}. `sae-diff train --help` lists the flags."
        )
    flat = ns.cfg
    values = {f.name: getattr(flat, f.name) for f in fields(PairedRunnerConfig)}
    sae_obj = values.pop("sae")
    sae_dict = {f.name: getattr(sae_obj, f.name) for f in fields(sae_obj)}
    sae_dict.pop("metadata", None)
    values["sae"] = {"architecture": sae_obj.architecture(), **sae_dict}
    return config_from_dict(values, keep_checkpoint_path=keep_checkpoint_path)


def config_flags_help(
    config_path: str | Path | None = None, architecture: str | None = None
) -> str:
    """Every config flag for the architecture of ``config_path`` (or ``architecture``), with
    its help text and current default (the file's value where it sets one)."""
    base: dict[str, Any] = read_config_file(config_path) if config_path is not None else {}
    if architecture is None and not (base.get("sae") or {}).get("architecture"):
        architecture = "batchtopk_crosscoder"
    arch, sae_values = _resolve(base, architecture, [])
    parser = _flags_parser(
        arch, {"d_in": 1, "d_sae": 2, **sae_values}, _runner_defaults(base), add_help=True
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        parser.parse_known_args(["--help"])  # simple_parsing adds its arguments while parsing
    head = (
        f"Config flags for architecture {arch!r} (defaults: "
        f"{'the values in ' + str(config_path) if config_path else 'SAELens / sae_diff defaults'}).\n"
        "Pass them after the subcommand, e.g. `sae-diff train --config FILE --lr 1e-4 --k 64`.\n"
    )
    return head + buf.getvalue()


__all__ = ["config_flags_help", "parse_config"]
