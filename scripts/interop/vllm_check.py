#!/usr/bin/env python3
"""vLLM side of the interop checks (the harness's vllm venv:
scripts/interop/setup.sh vllm). Prints one JSON object.

  vllm_check.py MODEL --data FILE [--ctx 1024] [--max-windows 8]
                [--prompt TEXT ...] [--max-tokens 32] [--ids 1,2,3]

Loads MODEL in vllm.LLM on the CPU (bf16, eager), then:
  - perplexity with ../shared/README.md's protocol from the prompt
    log-probabilities (SamplingParams(max_tokens=1, prompt_logprobs=0)) of
    each window of ctx tokens, encoded by the `tokenizers` library from
    MODEL/tokenizer.json exactly as transmla eval and hf.py do;
  - greedy continuations (temperature 0, EOS ignored) of each --prompt,
    with the top-2 log-probability gap of every step;
  - with --ids, the prompt log-probabilities of that id sequence
    (models without a tokenizer).
--native-rope disables vLLM's rotary_embedding custom op (its CPU kernel)
so that RoPE runs as PyTorch code (vllm_rope_repro.py).
VLLM_MLA_DISABLE=1 in the environment runs MLA checkpoints through
ordinary attention. The attention backend vLLM picked is reported.
"""
import argparse
import json
import math
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ids")
    ap.add_argument("--native-rope", action="store_true")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    has_tokenizer = os.path.exists(os.path.join(args.model, "tokenizer.json"))
    extra = {"compilation_config": {"custom_ops": ["-rotary_embedding"]}} if args.native_rope else {}
    # generate() must be allowed one token beyond the window. Where the
    # window fills max_position_embeddings (stories260K at ctx 512), vLLM
    # needs its override for that; no forward pass runs at that position,
    # since the one sampled token comes from the window's last logits.
    with open(os.path.join(args.model, "config.json")) as f:
        max_pos = json.load(f).get("max_position_embeddings")
    if max_pos is not None and args.ctx + 1 > max_pos:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    llm = LLM(model=args.model, dtype="bfloat16", enforce_eager=True, max_model_len=args.ctx + 1,
              max_num_seqs=1, gpu_memory_utilization=0.15, skip_tokenizer_init=not has_tokenizer, seed=0, **extra)
    out = {"model": args.model, "load_seconds": time.time() - t0,
           "mla_disabled": os.environ.get("VLLM_MLA_DISABLE", "0") == "1", "native_rope": args.native_rope}
    try:
        import vllm
        out["vllm"] = vllm.__version__
    except AttributeError:
        pass

    def prompt_logprobs(ids):
        res = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)[0]
        # Entry 0 is None (nothing predicts the first token).
        return [res.prompt_logprobs[i][tok].logprob for i, tok in enumerate(ids) if i > 0]

    if args.data:
        from tokenizers import Tokenizer
        with open(args.data, encoding="utf-8") as f:
            ids = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json")).encode(f.read()).ids
        windows = min(len(ids) // args.ctx, args.max_windows)
        nll, count = 0.0, 0
        t = time.time()
        for w in range(windows):
            lp = prompt_logprobs(ids[w * args.ctx:(w + 1) * args.ctx])
            nll -= sum(lp)
            count += len(lp)
        out.update({"ppl": math.exp(nll / count), "mean_nll": nll / count, "tokens_scored": count,
                    "windows": windows, "tokens_in_file": len(ids), "ppl_seconds": time.time() - t})
    if args.ids:
        out["prompt_logprobs"] = prompt_logprobs([int(i) for i in args.ids.split(",")])
    runs = []
    for prompt in args.prompt:
        from tokenizers import Tokenizer
        ids = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json")).encode(prompt).ids
        res = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True, logprobs=2),
                           use_tqdm=False)[0].outputs[0]
        gaps = []
        for step in res.logprobs:
            top = sorted((lp.logprob for lp in step.values()), reverse=True)
            gaps.append(top[0] - top[1] if len(top) > 1 else float("inf"))
        runs.append({"prompt": prompt, "prompt_ids": ids, "ids": list(res.token_ids), "top2_gaps": gaps})
    out["runs"] = runs
    print("VLLM_CHECK_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
