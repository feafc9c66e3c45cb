"""The command-line and environment layer, generated from the config dataclasses.

A run's config is ``preset -> PROTEUS_* environment -> command-line flags``, later layers
winning (:func:`build_config`). Flag and variable names are derived from field names
(``model_dim`` -> ``--model-dim`` and ``PROTEUS_MODEL_DIM``) and their values are parsed and
checked against the field's metadata (``proteus/config.py``). An unknown ``PROTEUS_*`` variable
is an error, not a silent no-op; so is one the command does not read (:data:`COMMAND_ENV`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import fields

from proteus.config import (
    _KIND_NAMES,
    SECTIONS,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    _field_problem,
    _field_type,
)
from proteus.errors import ConfigError
from proteus.presets import PRESETS


def _convert(kind: type, f, raw: str):
    """Text from the command line or the environment -> a value of field ``f``; ValueError with
    "expected ..., got ..." otherwise."""
    value: object = raw
    if kind is bool:
        low = raw.strip().lower()
        value = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}.get(low, raw)
    elif kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            pass
    problem = _field_problem(kind, f, value)
    if problem:
        raise ValueError(problem.rsplit(", got", 1)[0] + f", got {raw!r}")
    return value


def _parse_value(kind: type, f, raw: str, where: str):
    try:
        return _convert(kind, f, raw)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _arg_type(kind: type, f):
    def parse(raw: str):
        try:
            return _convert(kind, f, raw)
        except ValueError as e:  # argparse prints "argument --flag: <this message>"
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = _KIND_NAMES[kind]
    return parse


def _all_fields():
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield section, cls, f


def add_config_arguments(parser: argparse.ArgumentParser, sections=("model", "train", "eval")):
    """One ``--flag`` per config field (default None: 'not given'), grouped by section."""
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} options ({cls.__name__})")
        for f in fields(cls):
            if section == "train" and f.name == "preset":
                continue
            kind = _field_type(cls, f)
            flag = "--" + f.name.replace("_", "-")
            env = "PROTEUS_" + f.name.upper()
            rng = f.metadata.get("choices") and "|".join(f.metadata["choices"]) or \
                f.metadata.get("range")
            helptext = (f"{f.metadata.get('help', '')} [default {f.default!r}"
                        + (f"; {rng}" if rng else "") + f"; env {env}]")
            bare = dict(nargs="?", const=True) if kind is bool else {}  # a bare --flag: true
            group.add_argument(flag, dest=f"{section}.{f.name}", default=None,
                               type=_arg_type(kind, f), metavar=kind.__name__.upper(),
                               help=helptext.replace("%", "%%"), **bare)


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, dict]:
    """``PROTEUS_*`` variables as section overrides; unknown names are an error."""
    environ = os.environ if environ is None else environ
    known = {"PROTEUS_" + f.name.upper(): (section, cls, f) for section, cls, f in _all_fields()}
    out: dict[str, dict] = {s: {} for s in SECTIONS}
    for name, raw in environ.items():
        if not name.startswith("PROTEUS_"):
            continue
        if name not in known:
            raise ConfigError(
                f"unknown environment variable {name}; PROTEUS_* names must be config options "
                "(see `proteus train --help`); unset it"
            )
        section, cls, f = known[name]
        out[section][f.name] = _parse_value(_field_type(cls, f), f, raw, name)
    return out


# What the commands other than `train` read from PROTEUS_* variables: `eval` and `audit` start
# from the config their checkpoint or artifact was trained with and take only these options;
# the other commands take none. A variable a command does not read is refused, not ignored.
COMMAND_ENV = {
    "eval": ("eval.*", "train.kernels", "train.val_files"),
    "audit": ("eval.*",),
    "tune-cache": ("eval.*",),
}


def command_env(command: str, environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """``PROTEUS_*`` values a command other than ``train`` reads, as ``{"section.field": v}``;
    unknown names, bad values, and names the command does not read are errors."""
    allowed = COMMAND_ENV.get(command, ())
    out = {}
    for section, values in env_overrides(environ).items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in allowed and f"{section}.*" not in allowed:
                raise ConfigError(
                    f"environment variable PROTEUS_{name.upper()} does not apply to `proteus "
                    f"{command}`" + (" (the model and training options come from the "
                                     "checkpoint)" if command in COMMAND_ENV else "")
                    + "; unset it")
            out[key] = value
    return out


def eval_overrides(ec: EvalConfig, cli: Mapping[str, object]) -> EvalConfig:
    """``ec`` with the ``eval.*`` values given (``PROTEUS_*`` variables and flags, as
    :func:`command_env` and the parser give them), validated (the evaluation commands start
    from the config a checkpoint or artifact was trained with)."""
    over = {k.split(".", 1)[1]: v for k, v in cli.items()
            if k.startswith("eval.") and v is not None}
    out = dataclasses.replace(ec, **over)
    out.validate()
    return out


def resume_config(saved: RunConfig, cli: Mapping[str, object] | None = None,
                  environ: Mapping[str, str] | None = None, where: str = "the run") -> RunConfig:
    """The config a resumed run continues with: its own (``saved``), plus the ``PROTEUS_*`` and
    flag values that do not change what is trained (fields marked ``resume``: threads, logs,
    checkpoints, timeouts, compile, kernels, device; and every evaluation option). Any other
    value that differs from the run's is refused: a resumed run is the same run."""
    layers = saved.to_dict()
    given = {f"{s}.{k}": v for s, vals in env_overrides(environ).items() for k, v in vals.items()}
    given.update({k: v for k, v in (cli or {}).items() if v is not None})
    changed = []
    for key, value in given.items():
        section, name = key.split(".", 1)
        f = SECTIONS[section].__dataclass_fields__[name]
        if value != layers[section][name] and section != "eval" and not f.metadata.get("resume"):
            changed.append(f"{name} ({layers[section][name]!r} -> {value!r})")
        layers[section][name] = value
    if changed:
        raise ConfigError(
            f"{where} is resumed with its own config; these options differ from it: "
            f"{', '.join(changed)}; drop them, or start a new run")
    cfg = RunConfig(**{s: cls(**layers[s]) for s, cls in SECTIONS.items()})
    cfg.validate()
    return cfg


def build_config(
    preset: str, cli: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> RunConfig:
    """preset -> PROTEUS_* environment -> CLI flags (``{"section.field": value}``), validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    layers = {s: dict(PRESETS[preset].get(s, {})) for s in SECTIONS}
    layers["train"]["preset"] = preset
    for section, values in env_overrides(environ).items():
        layers[section].update(values)
    for key, value in (cli or {}).items():
        if value is None:
            continue
        section, name = key.split(".", 1)
        layers[section][name] = value
    cfg = RunConfig(
        model=ModelConfig(**layers["model"]),
        train=TrainConfig(**layers["train"]),
        eval=EvalConfig(**layers["eval"]),
    )
    cfg.validate()
    return cfg
