"""Command-line flags of ``sae-diff train``: a config file plus SAELens-style flags.

Why this does not use ``simple_parsing`` *subgroups* keyed by the architecture registry, as
SAELens's ``llm_sae_training_runner._parse_cfg_args`` does: here the architecture usually
comes from the config *file* (``sae.architecture``), whose ``sae:`` values must become the
flags' defaults; a subgroup picks its class while parsing, after defaults are set, so the
file's ``sae`` values cannot seed it, and ``--architecture`` overriding a file's architecture
(dropping, with a warning, the fields the new one lacks) needs the class before parsing. So
the architecture is resolved first (file or ``--architecture``, looked up in SAELens's
``SAE_TRAINING_CLASS_REGISTRY``, the same registry SAELens's subgroups are keyed by) and the
flags are parsed by ``simple_parsing`` against a twin of the config whose ``sae`` field has
that concrete class. Field names, help texts and defaults are SAELens's own.
"""

from __future__ import annotations

import argparse
from dataclasses import field, fields
from pathlib import Path
from typing import Any

from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAEConfig

from sae_diff.training.config import (
    PairedRunnerConfig,
    _sae_config,
    config_from_dict,
    read_config_file,
)
from sae_diff.training.errors import ConfigError, did_you_mean


def _cli_dataclass(sae_cls: type[TrainingSAEConfig]) -> type:
    """A flag-parsing twin of :class:`PairedRunnerConfig` with a concrete ``sae`` type and no
    ``__post_init__`` (the real config is built once, from the merged values)."""
    from dataclasses import make_dataclass

    return make_dataclass(
        "PairedRunnerFlags",
        [("sae", sae_cls, field(default=None))],  # type: ignore[arg-type]
        bases=(PairedRunnerConfig,),
        namespace={"__post_init__": lambda self: None},
    )


def parse_config(
    config_path: str | Path | None,
    args: list[str] | None = None,
    architecture: str | None = None,
    keep_checkpoint_path: bool = False,
) -> PairedRunnerConfig:
    """Build a config from a YAML/JSON file (optional) and SAELens-style flags.

    Flags override the file: ``--lr 1e-4 --k 64 --training_tokens 1_000_000`` (fields of the
    ``sae`` section use their own names, e.g. ``--d_sae``; where a name exists at both levels
    the sae one is ``--sae.dtype``). ``architecture`` (the ``--architecture`` flag) overrides
    ``sae.architecture``. ``keep_checkpoint_path``: a saved run's config (no new run id).
    """

    base: dict[str, Any] = read_config_file(config_path) if config_path is not None else {}
    sae_dict = dict(base.get("sae") or {})
    arch = architecture or sae_dict.get("architecture")
    if arch is None:
        raise ConfigError(
            "No architecture: give --architecture NAME or sae.architecture in the config file."
        )
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        _sae_config({"architecture": arch})  # raises the unknown-architecture error
    sae_cls = SAE_TRAINING_CLASS_REGISTRY[arch][1]
    file_arch = sae_dict.pop("architecture", None)
    sae_dict.pop("metadata", None)  # a saved run's metadata: the runner rebuilds it
    extra = sorted(set(sae_dict) - {f.name for f in fields(sae_cls)} - {"metadata"})
    if extra:
        if file_arch is not None and file_arch != arch:
            import warnings

            warnings.warn(
                f"--architecture {arch} replaces {file_arch}: ignoring the file's sae fields {extra}, "
                f"which {arch} does not have.",
                stacklevel=2,
            )
            sae_dict = {k: v for k, v in sae_dict.items() if k not in extra}
        else:
            valid = sorted(f.name for f in fields(sae_cls))
            hint = "".join(did_you_mean(u, valid, "sae.") for u in extra)
            raise ConfigError(
                f"Unknown field(s) {extra} for architecture {arch!r}{hint}; valid: {valid}."
            )
    defaults = {k: v for k, v in base.items() if k not in ("sae", "tokens_per_buffer")}
    unknown = sorted(set(defaults) - {f.name for f in fields(PairedRunnerConfig)})
    if unknown:
        config_from_dict({**base, "sae": {"architecture": arch, **sae_dict}})  # raises with hints
    defaults["sae"] = sae_dict
    if isinstance(defaults.get("seqpos_slice"), list):
        defaults["seqpos_slice"] = tuple(defaults["seqpos_slice"])
    parser = _flags_parser(sae_cls, defaults)
    try:
        ns, rest = parser.parse_known_args(list(args or []))
    except SystemExit as e:  # argparse errors exit; turn them into a config error
        raise ConfigError(f"Could not parse the flags {args}: see the message above.") from e
    except argparse.ArgumentError as e:  # a value outside a field's choices (e.g. --store_mode)
        raise ConfigError(f"Invalid flag value: {e}.") from e
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a dataclass rejected a flag's value (e.g. k > d_sae)
        raise ConfigError(f"Invalid flag value: {e}") from e
    if rest:
        known = [f.name for f in fields(PairedRunnerConfig)] + [f.name for f in fields(sae_cls)]
        hint = "".join(
            did_you_mean(r.split("=")[0], known, "--") for r in rest if r.startswith("-")
        )
        raise ConfigError(
            f"Unrecognised flag(s) {rest}{hint}. `sae-diff train --help` lists the flags."
        )
    flat = ns.cfg
    values = {f.name: getattr(flat, f.name) for f in fields(PairedRunnerConfig)}
    sae_obj = values.pop("sae")
    sae_values = {f.name: getattr(sae_obj, f.name) for f in fields(sae_cls)}
    sae_values.pop("metadata", None)
    values["sae"] = {"architecture": arch, **sae_values}
    return config_from_dict(values, keep_checkpoint_path=keep_checkpoint_path)


def _flags_parser(
    sae_cls: type[TrainingSAEConfig], defaults: dict[str, Any] | None = None, add_help: bool = False
) -> Any:
    from simple_parsing import ArgumentParser

    parser = ArgumentParser(prog="sae-diff train", add_help=add_help, exit_on_error=False)
    parser.add_arguments(_cli_dataclass(sae_cls), dest="cfg")
    if defaults is not None:
        parser.set_defaults(cfg=defaults)
    return parser


def config_flags_help(
    config_path: str | Path | None = None, architecture: str | None = None
) -> str:
    """Every config flag for the architecture of ``config_path`` (or ``architecture``), with
    its help text and current default (the file's value where it sets one)."""
    base: dict[str, Any] = read_config_file(config_path) if config_path is not None else {}
    sae_dict = dict(base.get("sae") or {})
    arch = architecture or sae_dict.pop("architecture", None) or "batchtopk_crosscoder"
    sae_dict.pop("architecture", None)
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        _sae_config({"architecture": arch})
    defaults = {k: v for k, v in base.items() if k not in ("sae", "tokens_per_buffer")}
    defaults["sae"] = {"d_in": 1, "d_sae": 2, **sae_dict}
    import contextlib
    import io

    parser = _flags_parser(SAE_TRAINING_CLASS_REGISTRY[arch][1], defaults, add_help=True)
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
