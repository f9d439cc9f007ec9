"""The baseline for `bench.py serve`: an OpenAI-style /v1/completions that answers each request with PEFT,
one request at a time: `set_adapter(name)` then a greedy `generate` (PEFT can run one adapter per forward).

    python benchmarks/peft_server.py --adapters DIR --port 8001   # DIR/<name>/ are PEFT LoRA folders
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from tinylora.models import load_model


class Completion(BaseModel):
    model: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    ignore_eos: bool = False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="embedded:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--adapters", required=True)
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args()
    from peft import PeftModel
    model, tok = load_model(args.model, "fp32", "cpu")
    folders = sorted(x for x in Path(args.adapters).iterdir() if x.is_dir())
    peft = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=folders[0].name)
    for f in folders[1:]:
        peft.load_adapter(str(f), adapter_name=f.name)
    lock = asyncio.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(req: Completion):
        async with lock:  # one adapter is active at a time: requests take turns
            return await asyncio.to_thread(run, req)

    def run(req: Completion) -> dict:
        peft.set_adapter(req.model)
        ids = tok(req.prompt, return_tensors="pt")
        with torch.no_grad():
            out = peft.generate(**ids, max_new_tokens=req.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                min_new_tokens=req.max_tokens if req.ignore_eos else 0)
        new = out[0, ids.input_ids.shape[1]:]
        return {"id": "cmpl-peft", "object": "text_completion", "created": int(time.time()), "model": req.model,
                "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True), "finish_reason": None}],
                "usage": {"prompt_tokens": ids.input_ids.shape[1], "completion_tokens": len(new),
                          "total_tokens": ids.input_ids.shape[1] + len(new)}}

    print(f"PEFT baseline: {len(folders)} adapters", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
