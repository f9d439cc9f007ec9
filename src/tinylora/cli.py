"""The `tinylora` command: count, info, export, merge."""

from __future__ import annotations

import argparse
import json
import sys

from .config import DEFAULT_TARGETS, METHODS, SVD_MODES, TIE_MODES, V_DTYPES, AdapterConfig


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--method", choices=METHODS, default="tinylora", help="what is trained (default: tinylora)")
    g.add_argument("--r", type=int, default=2, help="frozen SVD rank, or LoRA rank (default: 2)")
    g.add_argument("--u", type=int, default=1, help="tinylora: trainable numbers per tied group (default: 1)")
    g.add_argument("--n-tie", default="1", help="modules sharing one v, or 'all' (default: 1)")
    g.add_argument("--tie", choices=TIE_MODES, default="tiled", help="how modules are grouped (default: tiled)")
    g.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                   help="module-name suffixes, or one regex on full names (default: the 7 projections)")
    g.add_argument("--seed", type=int, default=0, help="seed of the fixed random projections P (default: 0)")
    g.add_argument("--v-dtype", choices=V_DTYPES, default="fp32", help="dtype of v (default: fp32)")
    g.add_argument("--svd", choices=SVD_MODES, default="full", help="SVD algorithm (default: full)")


def adapter_config(args) -> AdapterConfig:
    targets = args.targets[0] if len(args.targets) == 1 and not args.targets[0].isidentifier() else args.targets
    return AdapterConfig(method=args.method, r=args.r, u=args.u, n_tie=args.n_tie, tie=args.tie,
                         targets=targets, seed=args.seed, v_dtype=args.v_dtype, svd=args.svd)


def cmd_count(args) -> None:
    from .count import count, format_count
    c = count(args.model, adapter_config(args))
    print(json.dumps(c) if args.json else format_count(c))


def cmd_info(args) -> None:
    from .io import read_adapter_file
    config, meta, tensors = read_adapter_file(args.adapter)
    info = {"config": json.loads(config.to_json()), "base": meta.get("base"), "tinylora": meta.get("tinylora"),
            "fingerprint": meta["fingerprint"], "trainable_params": sum(t.numel() for t in tensors.values()),
            "v": {k: t.float().tolist() for k, t in tensors.items()} if config.method in ("tinylora", "lora-xs")
            else None}
    print(json.dumps(info, indent=None if args.json else 2))


def _load_with_adapter(args):
    from .io import load_adapter
    from .models import load_model
    model, tokenizer = load_model(args.model, args.dtype)
    return load_adapter(model, args.adapter, strict=not args.no_strict), tokenizer


def cmd_export(args) -> None:
    from .export import export_merged, export_peft
    adapter, tokenizer = _load_with_adapter(args)
    if args.format == "peft":
        out = export_peft(adapter, args.out)
    else:
        out = export_merged(adapter, args.out, tokenizer)
    print(f"wrote {args.format} export to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("count", help="count trainable parameters from a model config (no weights needed)")
    p.add_argument("--model", required=True, help="hub id from the offline catalogue, model folder or config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_adapter_args(p)
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("info", help="show an adapter file's settings, fingerprint and values")
    p.add_argument("adapter", help="adapter .safetensors file")
    p.add_argument("--json", action="store_true", help="print one line of JSON")
    p.set_defaults(func=cmd_info)

    for name, fmt_help in (("export", "export as a PEFT LoRA adapter (default) or a merged model folder"),
                           ("merge", "write base + adapter as one plain transformers model folder")):
        p = sub.add_parser(name, help=fmt_help)
        p.add_argument("--model", required=True, help="base model folder or hub id")
        p.add_argument("--adapter", required=True, help="adapter .safetensors file")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="load dtype")
        p.add_argument("--no-strict", action="store_true", help="load even if the base fingerprint differs")
        if name == "export":
            p.add_argument("--format", choices=["peft", "merged"], default="peft", help="(default: peft)")
            p.set_defaults(func=cmd_export)
        else:
            p.set_defaults(func=cmd_export, format="merged")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tinylora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
