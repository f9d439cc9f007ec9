"""The `tinylora` command: train, sweep, eval, serve, count, pack, info, export, merge."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tinylora.cli.flags import (
    adapter_config,
    add_adapter_args,
    add_config_args,
    add_train_args,
    config_from,
    train_configs,
)
from tinylora.config import V_DTYPES


def cmd_train(args) -> None:
    from tinylora.api import train
    train(*train_configs(args))


def cmd_sweep(args) -> int:
    from tinylora.study.sweep import run_sweep
    rows = run_sweep(args.spec, args.out, progress=not args.no_progress, dry_run=args.dry_run, only=args.only,
                     batched=args.batched)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def cmd_count(args) -> None:
    from tinylora.count import count, format_count
    c = count(args.model, adapter_config(args))
    print(json.dumps(c) if args.json else format_count(c))


def cmd_info(args) -> None:
    from tinylora.io import read_adapter_file
    config, meta, tensors = read_adapter_file(args.adapter)
    info = {"config": json.loads(config.to_json()), "base": meta.get("base"), "tinylora": meta.get("tinylora"),
            "fingerprint": meta["fingerprint"], "trainable_params": sum(t.numel() for t in tensors.values()),
            "v": {k: t.float().tolist() for k, t in tensors.items()} if config.method_object.single_v
            else None}
    print(json.dumps(info, indent=None if args.json else 2))


def cmd_export(args) -> None:
    from tinylora.export import export_merged, export_peft
    from tinylora.io import load_adapter
    from tinylora.models import load_model
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    adapter = load_adapter(model, args.adapter, strict=args.strict)
    out = export_peft(adapter, args.out) if args.format == "peft" else export_merged(adapter, args.out, tokenizer)
    print(f"wrote {args.format} export to {out}")


def cmd_eval(args) -> None:
    if args.compare:
        from tinylora.evaluation.paired import compare, format_comparison
        c = compare(*args.compare, seed=args.seed)
        print(json.dumps(c) if args.json else format_comparison(c))
        return
    from tinylora.api import DataConfig, ModelConfig, evaluate
    result = evaluate(config_from(ModelConfig, args), config_from(DataConfig, args), adapter=args.adapter,
                      split=args.split, n=args.n, samples=args.samples, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, reward=args.reward,
                      seed=args.seed, weights=args.weights, out=args.out, strict=args.strict, suffix=args.suffix,
                      system=args.system or None, progress=not args.json,
                      random_direction=args.random_direction)
    if args.json:
        print(json.dumps(result))
        return
    from tinylora.api import accuracy_line
    print(f"accuracy {accuracy_line(result, args.reward)} over {result['n_problems']} problems")
    if args.out:
        print(f"per-sample results: {args.out}")


def cmd_pack(args) -> None:
    from tinylora.storage.pack import Pack
    if args.action == "create":
        pack = Pack.create(args.pack, args.files)
        print(f"{pack.path}: {len(pack):,} adapters, {pack.path.stat().st_size:,} bytes")
        return
    with Pack(args.pack) as pack:
        if args.action == "add":
            names = pack.add(args.files)
            print(f"{pack.path}: added or replaced {len(names):,}; {len(pack):,} adapters")
        elif args.action == "rm":
            pack.remove(args.names)
            print(f"{pack.path}: removed {len(args.names):,}; {len(pack):,} adapters")
        elif args.action == "list":
            for name in pack.names(after=args.after or "", limit=args.limit):
                print(name)
        elif args.action == "info":
            info = pack.info()
            print(json.dumps(info) if args.json else "\n".join(f"{k:<12} {v}" for k, v in info.items()))
        elif args.action == "extract":
            print(f"wrote {pack.extract(args.name, args.out)}")


def cmd_serve(args) -> None:
    try:
        import uvicorn

        from tinylora.serve import Limits, build_server
        from tinylora.serve.app import create_app
    except ImportError as e:
        raise ValueError(f"serving needs FastAPI and uvicorn ({e}): pip install -e '.[serve]'") from e
    from tinylora.api import ModelConfig
    from tinylora.models import load_model
    mc = config_from(ModelConfig, args)
    name = args.served_model_name or mc.model
    model, tokenizer = load_model(mc.model, mc.dtype, mc.device)
    if args.graphs and next(model.parameters()).device.type != "cuda":
        raise ValueError("--graphs replays CUDA graphs: it needs a CUDA model (--device cuda or auto on a GPU)")
    server = build_server(model, tokenizer, name=name, adapters=args.adapters, limits=config_from(Limits, args),
                          strict=args.strict, weights=args.weights, api_key=args.api_key,
                          allow_runtime_adapters=args.allow_runtime_adapters, graphs=args.graphs)
    print(f"serving {name} and {len(server.bank)} adapters at http://{args.host}:{args.port}/v1 "
          f"({server.engine.weights}){'; API key required' if args.api_key else ''}", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_seconds)


def _add_train(sub) -> None:
    """`tinylora train`: every flag comes from the config dataclasses."""
    p = sub.add_parser("train", help="fine-tune with GRPO (or SFT); with no arguments, the embedded default run",
                       description="Evaluate the base model, train, evaluate again, write the adapter and a summary.")
    add_train_args(p)
    p.set_defaults(func=cmd_train)


def _add_sweep(sub) -> None:
    """`tinylora sweep SPEC --out DIR`."""
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
    p.add_argument("--only", metavar="REGEX", help="run only the runs whose name (as --dry-run lists them, "
                   "e.g. 'algo=grpo,lr=1e-06') the regular expression finds, e.g. '^algo=grpo,'; "
                   "the others stay as they are")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bars")
    p.add_argument("--batched", action="store_true", help="train together, in one process and batch, the runs "
                   "that differ only in seed, rate, schedule, clip, weight decay, reward, u, n-tie, tie or v-dtype "
                   "(each ends where it would alone; --dry-run shows the groups)")
    p.set_defaults(func=cmd_sweep)


def _add_eval(sub) -> None:
    """`tinylora eval`: score a model or an adapter, or compare two evaluations."""
    from tinylora.api import DataConfig, ModelConfig
    from tinylora.evaluation.config import EvalConfig
    from tinylora.generation.weights import CHOICES
    from tinylora.tasks.prompts import DEFAULT_SYSTEM
    p = sub.add_parser("eval", help="accuracy (95%% CI) of a model, with or without an adapter")
    add_config_args(p.add_argument_group("model"), ModelConfig)
    add_config_args(p.add_argument_group("data"), DataConfig, skip=("n",))
    p.add_argument("--n", type=int, default=100, help="problems to evaluate (default: 100)")
    p.add_argument("--adapter", help="adapter .safetensors file (default: the base model)")
    p.add_argument("--split", default="test", help="'train' or 'test' (default: test)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="one greedy completion per problem (default)")
    mode.add_argument("--samples", type=int, help="k sampled completions per problem (reports pass@k too)")
    add_config_args(p.add_argument_group("generation"), EvalConfig)
    p.add_argument("--reward", default="strict", help="answer rule: strict, boxed, lenient, or FILE.py:function / "
                   "module:function (default: strict); lenient accuracy is reported beside it")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--suffix", help="text appended to every question, as in train (default: the task's "
                   "answer-format instruction)")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt ('' for none), as in train")
    p.add_argument("--weights", choices=CHOICES, default="auto",
                   help="weights that generate, as --rollout-weights of train (default: auto, exact fp32)")
    p.add_argument("--out", help="write one JSON line per sample here (rerun after a kill: it resumes from "
                   "FILE.partial)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="load the adapter even if the base fingerprint differs")
    p.add_argument("--random-direction", type=int, metavar="SEED",
                   help="a control: evaluate --adapter with its v replaced by a random vector of the same norm "
                        "(seeded): does the trained direction matter, or would any nudge this big do?")
    p.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"),
                   help="evaluate nothing: compare two evaluations of the same problems (eval_*.jsonl of runs, or "
                        "--out files), strict and lenient: problems B gained and lost, exact McNemar p, paired "
                        "bootstrap 95%% CI of the difference (seeded by --seed)")
    p.set_defaults(func=cmd_eval)


def _add_serve(sub) -> None:
    """`tinylora serve`: the OpenAI-compatible server."""
    from tinylora.api import ModelConfig
    from tinylora.generation.weights import CHOICES
    from tinylora.serve.limits import Limits
    p = sub.add_parser("serve", help="OpenAI-compatible server for the base model and many adapters at once",
                       description="Serve /v1/completions, /v1/chat/completions and /v1/models. A request's 'model' "
                       "names the base model or an adapter (its file name without .safetensors), or the request "
                       "carries one inline ('adapter': {'config': {...}, 'v': [[...]]}); all of them decode in one "
                       "batch.")
    add_config_args(p.add_argument_group("model"), ModelConfig)
    p.add_argument("--adapters", action="append", metavar="FOLDER_OR_PACK",
                   help="a folder whose *.safetensors adapters are all served, or an adapter pack (`tinylora pack`: "
                        "read as requests name its adapters, a million start in a second); repeat for several")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("TINYLORA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint (default: $TINYLORA_API_KEY)")
    p.add_argument("--allow-runtime-adapters", action="store_true",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--weights", choices=[c for c in CHOICES if c != "merged"], default="auto",
                   help="weights that generate (default: auto: a packed fp32 copy on a CPU, hooks on a GPU)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="serve adapters even if their base fingerprint differs")
    p.add_argument("--graphs", action="store_true",
                   help="GPU: decode steps replayed as CUDA graphs over KV buffers of max-batch rows, grown to "
                        "the longest batch up to 4,096 tokens (longer contexts run the ordinary way); each batch "
                        "size's graph is recorded at start")
    add_config_args(p.add_argument_group("limits"), Limits)
    p.add_argument("--graceful-seconds", type=int, default=60,
                   help="on shutdown, wait this long for requests in flight (default: 60)")
    p.add_argument("--log-level", default="info", help="uvicorn's log level (default: info)")
    p.set_defaults(func=cmd_serve)


def _add_count(sub) -> None:
    """`tinylora count`: trainable parameters from a model config alone."""
    from tinylora.embedded import CATALOGUE
    p = sub.add_parser("count", help="count trainable parameters from a model config (no weights needed)")
    p.add_argument("--model", required=True, help="hub id from the offline catalogue, model folder, config.json, "
                   "or an embedded model: " + ", ".join(CATALOGUE))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_adapter_args(p)
    p.set_defaults(func=cmd_count)


def _add_pack(sub) -> None:
    """`tinylora pack ACTION PACK`: adapter packs."""
    p = sub.add_parser("pack", help="many adapters of one config and base in one file (SQLite): create, add, rm, "
                       "list, info, extract", description="An adapter pack stores the shared config and base once and "
                       "each adapter as its name (its file name without .safetensors) and v. Every change is one "
                       "transaction: a kill never loses what was acknowledged. Load one with --adapter PACK::NAME.")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, what: str) -> argparse.ArgumentParser:
        a = acts.add_parser(name, help=what)
        a.add_argument("pack", help="pack file")
        return a
    action("create", "a new pack from adapter files or folders of them").add_argument(
        "files", nargs="*", help="*.safetensors files or folders")
    action("add", "add or replace adapter files (or folders) in a pack").add_argument(
        "files", nargs="+", help="*.safetensors files or folders")
    action("rm", "remove adapters by name").add_argument("names", nargs="+", help="adapter names")
    a = action("list", "adapter names, sorted (page with --after and --limit)")
    a.add_argument("--after", help="start after this name")
    a.add_argument("--limit", type=int, help="at most this many names")
    action("info", "count, size, shared config and base").add_argument(
        "--json", action="store_true", help="print one JSON object")
    a = action("extract", "write one adapter as a normal .safetensors file")
    a.add_argument("name", help="adapter name")
    a.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_pack)


def _add_info(sub) -> None:
    """`tinylora info ADAPTER`."""
    p = sub.add_parser("info", help="show an adapter file's settings, fingerprint and values")
    p.add_argument("adapter", help="adapter .safetensors file")
    p.add_argument("--json", action="store_true", help="print one line of JSON")
    p.set_defaults(func=cmd_info)


def _add_export(sub) -> None:
    """`tinylora export` and `tinylora merge`."""
    for name, fmt_help in (("export", "export as a PEFT LoRA adapter (default) or a merged model folder"),
                           ("merge", "write base + adapter as one plain transformers model folder")):
        p = sub.add_parser(name, help=fmt_help)
        p.add_argument("--model", required=True, help="base model folder or hub id")
        p.add_argument("--adapter", required=True, help="adapter .safetensors file")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--dtype", choices=("auto", *V_DTYPES), default="fp32",
                       help="dtype the base is loaded, merged and written in (default: fp32 on every device: in "
                            "bf16 most of a TinyLoRA update, ~1e-3 of each weight, rounds away)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
        p.add_argument("--no-strict", dest="strict", action="store_false",
                       help="load even if the base fingerprint differs")
        if name == "export":
            p.add_argument("--format", choices=["peft", "merged"], default="peft", help="(default: peft)")
            p.set_defaults(func=cmd_export)
        else:
            p.set_defaults(func=cmd_export, format="merged")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_sweep, _add_eval, _add_serve, _add_count, _add_pack, _add_info, _add_export):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() adds quotes
        print(f"tinylora {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinylora {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
