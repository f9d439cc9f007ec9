"""The `tinylora` command: train, sweep, eval, count, info, export, merge."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .config import DEFAULT_TARGETS, METHODS, SVD_MODES, TIE_MODES, V_DTYPES, AdapterConfig


def add_adapter_args(p: argparse.ArgumentParser, n_tie: str = "1", seed: bool = True) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--method", choices=METHODS, default="tinylora", help="what is trained (default: tinylora)")
    g.add_argument("--r", type=int, default=2, help="frozen SVD rank, or LoRA rank (default: 2)")
    g.add_argument("--u", type=int, default=1, help="tinylora: trainable numbers per tied group (default: 1)")
    g.add_argument("--n-tie", default=n_tie, help=f"modules sharing one v, or 'all' (default: {n_tie})")
    g.add_argument("--tie", choices=TIE_MODES, default="tiled", help="how modules are grouped (default: tiled)")
    g.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                   help="module-name suffixes, or one regex on full names (default: the 7 projections)")
    if seed:  # `train` has one --seed for everything
        g.add_argument("--seed", type=int, default=0, help="seed of the fixed random projections P (default: 0)")
    g.add_argument("--v-dtype", choices=V_DTYPES, default="fp32", help="dtype of v (default: fp32)")
    g.add_argument("--svd", choices=SVD_MODES, default="full", help="SVD algorithm (default: full)")


def adapter_config(args) -> AdapterConfig:
    targets = args.targets[0] if len(args.targets) == 1 and not args.targets[0].isidentifier() else args.targets
    return AdapterConfig(method=args.method, r=args.r, u=args.u, n_tie=args.n_tie, tie=args.tie,
                         targets=targets, seed=args.seed, v_dtype=args.v_dtype, svd=args.svd)


def cmd_train(args) -> None:
    from .run import run_training
    run_training(args)


def cmd_sweep(args) -> int:
    from .sweep import run_sweep
    rows = run_sweep(args.spec, args.out, progress=not args.no_progress, dry_run=args.dry_run)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


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
    """(model, adapter or None without --adapter, tokenizer)."""
    from .io import load_adapter
    from .models import load_model
    model, tokenizer = load_model(args.model, args.dtype)
    adapter = load_adapter(model, args.adapter, strict=not args.no_strict) if args.adapter else None
    return model, adapter, tokenizer


def cmd_export(args) -> None:
    from .export import export_merged, export_peft
    _, adapter, tokenizer = _load_with_adapter(args)
    if args.format == "peft":
        out = export_peft(adapter, args.out)
    else:
        out = export_merged(adapter, args.out, tokenizer)
    print(f"wrote {args.format} export to {out}")


def add_task_args(p: argparse.ArgumentParser, default_n: int) -> None:
    from .embedded import DEFAULT_MODEL
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder or hub id (default: {DEFAULT_MODEL}, embedded, offline)")
    g.add_argument("--dtype", choices=V_DTYPES, default="fp32", help="weights dtype (default: fp32)")
    g.add_argument("--task", default="arithmetic",
                   help="'arithmetic' (generated offline), 'gsm8k', or a .jsonl file (default: arithmetic)")
    g.add_argument("--data", help="your own .jsonl file of {question, answer} rows (same as --task FILE)")
    g.add_argument("--gsm8k-dir", help="folder with GSM8K train.jsonl/test.jsonl (else $TINYLORA_GSM8K_DIR, "
                                       "else the hub)")
    g.add_argument("--levels", default="1,2", help="arithmetic difficulty levels 1-3 (default: 1,2)")
    g.add_argument("--n", type=int, default=default_n, help=f"problems to use (default: {default_n})")


def task_problems(args, split: str, n: int | None, seed: int = 0):
    from .tasks import load_task
    task = args.data or args.task
    kwargs = {}
    if task == "arithmetic":
        kwargs["levels"] = tuple(int(x) for x in args.levels.split(","))
    elif task == "gsm8k":
        kwargs["data_dir"] = args.gsm8k_dir
    return load_task(task, split=split, n=n, seed=seed, **kwargs)


def cmd_eval(args) -> None:
    from .cpu_weights import for_generation
    from .evaluate import evaluate
    model, adapter, tokenizer = _load_with_adapter(args)
    problems = task_problems(args, args.split, args.n)
    weights = for_generation(model, args.weights, adapter.config.method if adapter is not None else "frozen")
    result = evaluate(model, tokenizer, problems, adapter=adapter, weights=weights, greedy=args.samples is None,
                      samples=args.samples or 1, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      batch_size=args.batch_size, reward=args.reward, out_jsonl=args.out, seed=args.seed,
                      progress=not args.json)
    result.update(model=args.model, adapter=args.adapter, task=args.data or args.task, split=args.split)
    if args.json:
        print(json.dumps(result))
    else:
        lo, hi = result["ci95"]
        llo, lhi = result["lenient_ci95"]
        print(f"accuracy {result['accuracy']:.1%}  (95% CI {lo:.1%}-{hi:.1%}, {result['n_samples']} samples"
              f" of {result['n_problems']} problems, reward {args.reward})")
        print(f"lenient  {result['lenient_accuracy']:.1%}  (95% CI {llo:.1%}-{lhi:.1%}: the last number in the"
              " completion equals the gold)")
        if args.out:
            print(f"per-sample results: {args.out}")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every flag of `tinylora train` (also how `tinylora sweep` checks a spec's options)."""
    from .train import TrainConfig
    add_task_args(p, default_n=2000)
    add_adapter_args(p, n_tie="1", seed=False)
    g = p.add_argument_group("training")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            g.add_argument(flag, type=type(f.default), default=f.default, choices=f.metadata.get("choices"),
                           help=f"{f.metadata['help']} (default: {f.default!r})")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="output folder (default: runs/default)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    g.add_argument("--eval-n", type=int, default=200,
                   help="held-out problems evaluated before and after, the same set for every --seed (0: skip)")
    g.add_argument("--eval-batch-size", type=int, default=50, help="sequences generated together in evaluation")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .cpu_weights import CHOICES
    parser = argparse.ArgumentParser(prog="tinylora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune with GRPO (or SFT); with no arguments, the embedded default run",
                       description="Evaluate the base model, train, evaluate again, write the adapter and a summary.")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run many `train` runs from a TOML spec, resumably, into one results.csv",
                       description="Run every run of SPEC not yet finished under OUT (each `tinylora train "
                       "--resume` in OUT/runs/NAME/), then write OUT/results.csv and OUT/accuracy_vs_params.png. "
                       "Rerun the same command to continue after Ctrl-C, kill -9 or a crash.",
                       epilog="SPEC: a [shared] table and [[run]] tables of train options without the dashes "
                              "(steps = 20, n-tie = [\"all\", 16]); a list expands into one run per value, "
                              "several lists into their grid.")
    p.add_argument("spec", help="sweep spec (.toml)")
    p.add_argument("--out", required=True, help="sweep folder: runs/, results.csv, accuracy_vs_params.png")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their train flags, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="accuracy (95% CI) of a model, with or without an adapter")
    add_task_args(p, default_n=100)
    p.add_argument("--adapter", help="adapter .safetensors file (default: the base model)")
    p.add_argument("--split", default="test", help="'train' or 'test' (default: test)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="one greedy completion per problem (default)")
    mode.add_argument("--samples", type=int, help="k sampled completions per problem (reports pass@k too)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature with --samples")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="completion length limit (default: 32, as in training)")
    p.add_argument("--batch-size", type=int, default=50, help="sequences generated together (default: 50)")
    p.add_argument("--reward", choices=["strict", "boxed"], default="strict", help="answer rule (default: strict)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--weights", choices=CHOICES, default="auto",
                   help="weights that generate, as --rollout-weights of train (default: auto, exact fp32)")
    p.add_argument("--out", help="write one JSON line per sample here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-strict", action="store_true", help="load the adapter even if the base fingerprint differs")
    p.set_defaults(func=cmd_eval)

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
        p.add_argument("--dtype", choices=V_DTYPES, default="fp32", help="load dtype")
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
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tinylora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinylora {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
