#!/usr/bin/env python3
"""transformers side of the interop checks (run it with the harness's python,
scripts/interop/setup.sh). Every subcommand prints one JSON object.

  hf.py ppl MODEL --data FILE [--ctx 1024] [--max-windows N] [--dtype float32]
      perplexity with ../shared/README.md's protocol: the whole file encoded
      by the `tokenizers` library from MODEL/tokenizer.json (special tokens
      where its post-processor adds them), non-overlapping windows of ctx,
      the tail dropped, positions 1..ctx-1 scored, ppl = exp(mean NLL).
  hf.py greedy MODEL --prompt TEXT [--prompt TEXT ...] [--max-tokens 32]
      greedy continuation of each prompt through transformers' KV cache,
      EOS ignored, with the top-2 logit gap of every step.
  hf.py resave MODEL OUT
      load and save_pretrained again (with the tokenizer files).
  hf.py logits MODEL OUT --ids 1,2,3
      the float32 logits of ids (as fixture writes them) into OUT.
  hf.py fixture OUT --spec JSON
      a randomly initialised model of spec {"arch", "config", "dtype",
      "seed", "ids"} saved by save_pretrained into OUT, and OUT/logits.f32:
      the logits of ids (row-major float32, little-endian) computed in
      float32 from the saved weights.

Models load through AutoModelForCausalLM, never trust_remote_code, and a
checkpoint whose tensors do not match the class exactly (missing,
unexpected or mismatched weights, which transformers would initialise
silently) is an error.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import transformers
from tokenizers import Tokenizer

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def load(path, dtype):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), output_loading_info=True, attn_implementation="eager")
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        sys.exit(f"hf.py: {path} does not match {type(model).__name__}: {bad}")
    return model.eval()


def encode(path, text):
    return Tokenizer.from_file(os.path.join(path, "tokenizer.json")).encode(text).ids


@torch.no_grad()
def ppl(args):
    model = load(args.model, args.dtype)
    if args.ctx > model.config.max_position_embeddings:
        sys.exit(f"hf.py: --ctx {args.ctx} exceeds max_position_embeddings {model.config.max_position_embeddings}")
    with open(args.data, encoding="utf-8") as f:
        ids = encode(args.model, f.read())
    windows = len(ids) // args.ctx
    if args.max_windows:
        windows = min(windows, args.max_windows)
    if windows == 0:
        sys.exit(f"hf.py ppl: {args.data} has {len(ids)} tokens, fewer than one window of --ctx {args.ctx}")
    total, count, start = 0.0, 0, time.perf_counter()
    for w in range(windows):
        x = torch.tensor([ids[w * args.ctx:(w + 1) * args.ctx]])
        logits = model(x, use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        total -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += args.ctx - 1
    mean, seconds = total / count, time.perf_counter() - start
    return {"ppl": math.exp(mean), "mean_nll": mean, "tokens_scored": count, "windows": windows,
            "tokens_in_file": len(ids), "ctx": args.ctx, "dtype": args.dtype, "seconds": seconds,
            "tokens_per_second": windows * args.ctx / seconds, "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "architecture": type(model).__name__, "transformers": transformers.__version__}


@torch.no_grad()
def greedy(args):
    model = load(args.model, args.dtype)
    runs = []
    for prompt in args.prompt:
        ids = encode(args.model, prompt)
        cache = transformers.DynamicCache(config=model.config)
        x, out, gaps = torch.tensor([ids]), [], []
        for _ in range(args.max_tokens):
            logits = model(x, past_key_values=cache, use_cache=True).logits[0, -1].double()
            top = torch.topk(logits, 2)
            out.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            x = torch.tensor([[out[-1]]])
        runs.append({"prompt": prompt, "prompt_ids": ids, "ids": out, "top2_gaps": gaps})
    return {"runs": runs, "architecture": type(model).__name__}


def resave(args):
    model = load(args.model, "float32")
    # Saved in the dtype the checkpoint declares, as a user's round trip would.
    dtype = getattr(model.config, "dtype", None) or torch.float32
    model.to(dtype).save_pretrained(args.out)
    for name in SIDE_FILES:
        if os.path.exists(os.path.join(args.model, name)):
            shutil.copy(os.path.join(args.model, name), args.out)
    return {"out": args.out, "dtype": str(dtype), "architecture": type(model).__name__}


@torch.no_grad()
def logits_of(model, ids, out):
    logits = model(torch.tensor([ids]), use_cache=False).logits[0].float().contiguous()
    with open(out, "wb") as f:
        f.write(logits.numpy().astype("<f4").tobytes())
    return list(logits.shape)


def logits(args):
    model = load(args.model, "float32")
    return {"out": args.out, "shape": logits_of(model, [int(i) for i in args.ids.split(",")], args.out),
            "architecture": type(model).__name__}


@torch.no_grad()
def fixture(args):
    spec = json.loads(args.spec)
    cls = getattr(transformers, spec["arch"])
    torch.manual_seed(spec.get("seed", 0))
    model = cls(cls.config_class(**spec["config"]))
    # transformers' own init (std 0.02) leaves attention almost uniform;
    # weights of unit gain make every part of the forward pass matter.
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.3 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    model.to(getattr(torch, spec.get("dtype", "float32"))).save_pretrained(args.out)
    shape = logits_of(load(args.out, "float32"), spec["ids"], os.path.join(args.out, "logits.f32"))
    return {"out": args.out, "shape": shape, "architecture": spec["arch"],
            "transformers": transformers.__version__, "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl")
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p = sub.add_parser("greedy")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p = sub.add_parser("resave")
    p.add_argument("model")
    p.add_argument("out")
    p = sub.add_parser("logits")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--ids", required=True)
    p = sub.add_parser("fixture")
    p.add_argument("out")
    p.add_argument("--spec", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("TRANSMLA_INTEROP_THREADS", torch.get_num_threads())))
    print(json.dumps({"ppl": ppl, "greedy": greedy, "resave": resave, "logits": logits, "fixture": fixture}[args.cmd](args)))


if __name__ == "__main__":
    main()
