"""A sweep spec: a TOML file of [shared] options and [[run]] entries, lists expanded into runs, every option
checked against `tinylora train`'s flags before anything runs."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

RESERVED = ("out", "resume")  # the sweep sets these itself


@dataclass
class Run:
    name: str
    options: dict  # as written in the spec (dashes), after expansion
    argv: list[str]
    args: argparse.Namespace  # train's parsed flags, defaults filled in
    key: str = field(init=False)  # a hash of argv: a run folder made with other options is not this run

    def __post_init__(self):
        self.key = hashlib.sha256("\0".join(self.argv).encode()).hexdigest()[:12]


class TrainParser(argparse.ArgumentParser):
    """`tinylora train`'s flags, raising ValueError on a bad one; `flags` maps each dest to its action."""

    def __init__(self):
        from tinylora.cli.flags import add_train_args
        super().__init__(prog="tinylora train", add_help=False)
        self.flags = add_train_args(self)

    def error(self, message):  # raise instead of exiting: the sweep names the run and the spec
        raise ValueError(message)


def to_argv(options: dict, parser: TrainParser) -> list[str]:
    """{"n-tie": 16, "std-norm": False, "targets": "q_proj v_proj"} → ["--n-tie", "16", "--no-std-norm", ...]."""
    flags = parser.flags
    argv = []
    for k, v in options.items():
        dest = k.replace("-", "_")
        action = flags.get(dest)
        if action is None or dest in RESERVED:
            raise ValueError(f"unknown option {k!r}" if dest not in RESERVED else f"{k!r} is set by the sweep itself")
        flag = "--" + dest.replace("_", "-")
        if isinstance(v, bool):
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if v else "--no-" + flag[2:])
            elif v:
                argv.append(flag)
            continue
        if isinstance(v, (list, dict)):
            raise ValueError(f"option {k!r}: expected one value, got {v!r}")
        argv.append(flag)
        argv.extend(str(v).split() if action.nargs in ("+", "*") else [str(v)])
    return argv


def load_spec(path: str | Path) -> list[Run]:
    """The runs a spec file describes, checked against `tinylora train`'s flags before anything runs."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep spec not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    unknown = set(spec) - {"shared", "run"}
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {sorted(unknown)}; a spec has [shared] and [[run]] entries")
    shared = spec.get("shared", {})
    groups = spec.get("run", [{}])
    if not isinstance(shared, dict) or not isinstance(groups, list):
        raise ValueError(f"{path}: [shared] must be a table and each [[run]] a table")
    expanded = []  # (group number, options)
    for gi, group in enumerate(groups, start=1):
        merged = {**shared, **group}
        lists = [k for k, v in merged.items() if isinstance(v, list)]
        for combo in itertools.product(*(merged[k] for k in lists)):
            expanded.append((gi, {**merged, **dict(zip(lists, combo))}))
    if not expanded:
        raise ValueError(f"{path}: no runs (an empty list expands to nothing)")
    # a run's name: its explicit `name`, then the options whose values differ across the sweep
    keys = list(dict.fromkeys(k for _, o in expanded for k in o if k != "name"))
    varying = [k for k in keys if len({json.dumps(o.get(k)) for _, o in expanded}) > 1]
    from tinylora.cli.flags import train_configs
    parser, runs, seen = TrainParser(), [], {}
    for gi, options in expanded:
        name = options.get("name")
        parts = ([str(name)] if name else []) + [f"{k}={options[k]}" for k in varying if k in options]
        name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts) or "run")
        opts = {k: v for k, v in options.items() if k != "name"}
        where = f"{path}: run {name!r} (entry {gi})"
        try:
            argv = to_argv(opts, parser)
            args = parser.parse_args(argv)
            train_configs(args)  # every value checked now, not an hour into the sweep
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if name in seen:
            raise ValueError(f"{where}: the same name as another run; give the entries different `name`s")
        seen[name] = True
        runs.append(Run(name, opts, argv, args))
    return runs
