#!/usr/bin/env python3
"""The interop table: model × format × shape → perplexity in transmla,
transformers and vLLM, and greedy agreement (README, "Engines that load the
export"). Run by vllm_check.sh with the harness's vllm python; WORK keeps
every conversion and every engine's JSON output.

  table.py TRANSMLA SHARED WORK [--windows 8] [--only NAME,...]
"""
import argparse
import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["The history of the city", "In 1990, the team", "She opened the door and"]

# name, source model, ctx, convert flags (None: the original), vLLM with MLA disabled
ROWS = [
    ("llama original", "llama-gqa-25m", 1024, None, False),
    ("llama dc192 dr64", "llama-gqa-25m", 1024, ["--dc", "192"], True),
    ("llama dc448 dr64", "llama-gqa-25m", 1024, ["--dc", "448"], True),
    ("llama dc448 dr64 MLA on (refused)", "llama-gqa-25m", 1024, ["--dc", "448"], False),
    ("llama dc320 dr128", "llama-gqa-25m", 1024, ["--dc", "320", "--rope-dim", "128"], True),
    ("llama dc448 dr64 padded 512", "llama-gqa-25m", 1024, ["--dc", "448", "--target", "vllm-cpu"], False),
    ("llama dc192 dr64 padded 512", "llama-gqa-25m", 1024, ["--dc", "192", "--target", "vllm-cpu"], False),
    # convert --cache: the searched split (RoPE strides that change rope_theta)
    ("llama cache 256 (search)", "llama-gqa-25m", 1024, ["--cache", "256"], True),
    ("llama cache 320 (search)", "llama-gqa-25m", 1024, ["--cache", "320"], True),
    ("llama cache 256 (search) padded 512", "llama-gqa-25m", 1024, ["--cache", "256", "--target", "vllm-cpu"], False),
    ("qwen2 original", "qwen2-gqa-16m", 1024, None, False),
    ("qwen2 dc192 dr64", "qwen2-gqa-16m", 1024, ["--dc", "192"], True),
    ("qwen2 dc448 dr64", "qwen2-gqa-16m", 1024, ["--dc", "448"], True),
    ("qwen2 dc448 dr64 padded 512", "qwen2-gqa-16m", 1024, ["--dc", "448", "--target", "vllm-cpu"], False),
    ("qwen2 cache 256 (search)", "qwen2-gqa-16m", 1024, ["--cache", "256"], True),
    ("stories original", "stories260K", 512, None, False),
    ("stories dc32 dr8", "stories260K", 512, ["--dc", "32"], True),
]


def sh(cmd, env=None, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd[:3]}: exit {p.returncode}: {p.stderr[-2000:]}")
    return p


def cached(path, make):
    if not os.path.exists(path):
        out = make()
        with open(path, "w") as f:
            json.dump(out, f)
    return json.load(open(path))


def agree(a, b):
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("transmla")
    ap.add_argument("shared")
    ap.add_argument("work")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    data = os.path.join(a.shared, "data/wikitext-2-raw/wiki.test.raw")
    calib = os.path.join(a.shared, "data/calibration/heldout.txt")
    py = sys.executable
    print("| model · format · shape | transmla f32 | transformers f32 | rel. diff | transmla bf16 cache | vLLM bf16 | rel. diff | greedy transmla=transformers | greedy transmla(bf16)=vLLM | vLLM backend |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, src, ctx, flags, nomla in ROWS:
        if a.only and not any(o in name for o in a.only.split(",")):
            continue
        key = name.replace(" ", "_").replace("(", "").replace(")", "")
        model = os.path.join(a.shared, "models", src)
        if flags is not None:
            model = os.path.join(a.work, key.replace("_MLA_on_refused", ""))
            if not os.path.exists(model):
                sh([a.transmla, "convert", os.path.join(a.shared, "models", src), "-o", model, "--calib", calib] + flags)
        ev = lambda dt: json.loads(sh([a.transmla, "eval", model, "--data", data, "--ctx", str(ctx), "--max-windows", str(a.windows), "--json", "--cache-dtype", dt]).stdout)
        ours = cached(os.path.join(a.work, key + ".transmla-f32.json"), lambda: ev("f32"))
        ours16 = cached(os.path.join(a.work, key + ".transmla-bf16.json"), lambda: ev("bf16"))
        hf = cached(os.path.join(a.work, key + ".hf.json"), lambda: json.loads(sh([py, os.path.join(HERE, "hf.py"), "ppl", model, "--data", data, "--ctx", str(ctx), "--max-windows", str(a.windows)]).stdout))
        hfg = cached(os.path.join(a.work, key + ".hf-greedy.json"), lambda: json.loads(sh([py, os.path.join(HERE, "hf.py"), "greedy", model] + sum((["--prompt", p] for p in PROMPTS), [])).stdout))

        def gen(dt):
            return [json.loads(sh([a.transmla, "generate", model, "--prompt", p, "--max-tokens", "32", "--ids", "--ignore-eos", "--cache-dtype", dt]).stdout) for p in PROMPTS]
        og = cached(os.path.join(a.work, key + ".transmla-greedy.json"), lambda: {"f32": gen("f32"), "bf16": gen("bf16")})

        def vl():
            env = dict(os.environ, VLLM_MLA_DISABLE="1" if nomla else "0")
            cmd = [py, os.path.join(HERE, "vllm_check.py"), model, "--data", data, "--ctx", str(ctx), "--max-windows", str(a.windows)] + sum((["--prompt", p] for p in PROMPTS), [])
            p = sh(cmd, env=env, check=False)
            log = (p.stdout + p.stderr).splitlines()
            # vLLM logs which attention backend it picked, e.g. "Using CPU_MLA backend".
            backends = sorted({w for l in log if "backend" in l and "Triton" not in l
                               for w in l.replace(".", " ").split() if w.isupper() and "_" in w})
            for line in log:
                if line.startswith("VLLM_CHECK_JSON "):
                    out = json.loads(line[len("VLLM_CHECK_JSON "):])
                    out["backends"] = backends
                    return out
            # The root cause, not the EngineDeadError that reports it: the
            # last error line of the worker or engine, without its log prefix.
            err = [l.split("] ", 1)[-1] if l.startswith("(") else l for l in log
                   if "Error" in l and "EngineDeadError" not in l and "Traceback" not in l and "File " not in l]
            return {"failed": (err[-1] if err else "\n".join(log[-3:])).strip(), "backends": backends}
        v = cached(os.path.join(a.work, key + ".vllm.json"), vl)

        rel = abs(ours["ppl"] - hf["ppl"]) / hf["ppl"]
        g1 = [agree(o, h["ids"]) for o, h in zip(og["f32"], hfg["runs"])]
        if "failed" in v:
            vcol, vrel, g2, backend = "refused: " + v["failed"][-200:].replace("|", "/"), "—", "—", ", ".join(v.get("backends", []))
        else:
            vcol = f"{v['ppl']:.4f}"
            vrel = f"{abs(ours16['ppl'] - v['ppl']) / v['ppl']:.1e}"
            g2 = "/".join(str(agree(o, r["ids"])) for o, r in zip(og["bf16"], v["runs"]))
            # vLLM logs its choice of MLA backends only; the CPU platform
            # takes CPU_ATTN for everything else (platforms/cpu.py).
            backend = ", ".join(v.get("backends", [])) or "CPU_ATTN"
        print(f"| {name} | {ours['ppl']:.4f} | {hf['ppl']:.4f} | {rel:.1e} | {ours16['ppl']:.4f} | {vcol} | {vrel} | {'/'.join(map(str, g1))} | {g2} | {backend} |", flush=True)


if __name__ == "__main__":
    main()
