"""Flags made from the config dataclasses: shared by `tinylora train` and the sweep's spec check."""

from __future__ import annotations

import argparse
from dataclasses import fields

from tinylora.config import DEFAULT_TARGETS, SVD_MODES, TIE_MODES, V_DTYPES, AdapterConfig
from tinylora.methods import METHODS


def add_adapter_args(p: argparse.ArgumentParser, seed: bool = True) -> list[argparse.Action]:
    n_tie = AdapterConfig.__dataclass_fields__["n_tie"].default  # one default, the dataclass's
    g, actions = p.add_argument_group("adapter"), []

    def add(*flags, **kw):
        actions.append(g.add_argument(*flags, **kw))

    add("--method", choices=list(METHODS), default="tinylora", help="what is trained (default: tinylora)")
    add("--r", type=int, default=2, help="frozen SVD rank, or LoRA rank (default: 2)")
    add("--u", type=int, default=1, help="tinylora: trainable numbers per tied group (default: 1)")
    add("--n-tie", default=n_tie, help=f"modules sharing one v, or 'all' (default: {n_tie})")
    add("--tie", choices=TIE_MODES, default="tiled", help="how modules are grouped (default: tiled)")
    add("--targets", nargs="+", default=list(DEFAULT_TARGETS),
        help="module-name suffixes, or one regex on full names (default: the 7 projections)")
    if seed:  # `train` has one --seed for everything
        add("--seed", type=int, default=0, help="seed of the fixed random projections P (default: 0)")
    add("--v-dtype", choices=V_DTYPES, default="fp32", help="dtype of v (default: fp32)")
    add("--svd", choices=SVD_MODES, default="full", help="SVD algorithm (default: full)")
    add("--lora-alpha", type=float, default=None, help="lora: the update is scaled by lora_alpha / r "
        "(default: r, a scale of 1)")
    return actions


def adapter_config(args) -> AdapterConfig:
    targets = args.targets[0] if len(args.targets) == 1 and not args.targets[0].isidentifier() else args.targets
    return AdapterConfig(method=args.method, r=args.r, u=args.u, n_tie=args.n_tie, tie=args.tie,
                         targets=targets, seed=args.seed, v_dtype=args.v_dtype, svd=args.svd,
                         lora_alpha=args.lora_alpha)


def add_config_args(g, cls, skip: tuple[str, ...] = ()) -> list[argparse.Action]:
    """One flag per dataclass field (help from its metadata): how every config becomes flags."""
    actions = []
    for f in fields(cls):
        if f.name in skip:
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            actions.append(g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                          help=f.metadata["help"]))
            continue
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        kind = type(default) if default is not None else str
        shown = f.metadata.get("default_help", repr(default))
        actions.append(g.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                                      help=f"{f.metadata['help']} (default: {shown})"))
    return actions


def config_from(cls, args, **overrides):
    """The dataclass `cls` from the flags add_config_args made (plus overrides)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **overrides)


def train_configs(args) -> tuple:
    """(ModelConfig, DataConfig, AdapterConfig, TrainConfig, RunConfig) of `tinylora train`'s flags; a bad
    value raises ValueError naming its flag."""
    from tinylora.api import DataConfig, ModelConfig, RunConfig, TrainConfig
    return (config_from(ModelConfig, args), config_from(DataConfig, args), adapter_config(args),
            config_from(TrainConfig, args), config_from(RunConfig, args))


def add_train_args(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every flag of `tinylora train` (also how `tinylora sweep` checks a spec's options), by dest."""
    from tinylora.api import DataConfig, ModelConfig, RunConfig, TrainConfig
    actions = [*add_config_args(p.add_argument_group("model"), ModelConfig),
               *add_config_args(p.add_argument_group("data"), DataConfig),
               *add_adapter_args(p, seed=False),
               *add_config_args(p.add_argument_group("training"), TrainConfig),
               *add_config_args(p.add_argument_group("run"), RunConfig)]
    return {a.dest: a for a in actions}
