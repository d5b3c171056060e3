#!/usr/bin/env python3
"""Minimal reproduction of the vLLM 0.32 CPU rotary bug that breaks
DeepSeek-V2/V3 models with plain RoPE (README, "Measured in the engines").
Run it with the harness's vllm python (scripts/interop/setup.sh vllm):

  vllm_rope_repro.py op
      seconds: vLLM's rotary op on q_pe and k_pe laid out exactly as
      deepseek_v2.py and layers/mla.py pass them, against a hand-written
      interleaved RoPE; prints the maximum error of each route.
  vllm_rope_repro.py model WORK
      minutes: a random DeepseekV3ForCausalLM built by transformers
      (save_pretrained), loaded in vllm.LLM with plain RoPE, with the CPU
      rotary op disabled, and with plain RoPE declared as a YaRN of
      factor 1 (what transmla's exports write); prints the largest prompt
      log-probability difference against transformers, for the ordinary
      attention path (VLLM_MLA_DISABLE=1) and for CPU_MLA (512 + 64); and
      transformers' logits with plain RoPE against YaRN of factor 1.

The cause: for rope_type default, DeepseekV2Attention and the MLA wrapper
build RotaryEmbedding(is_neox_style=False) and call it on q[..., nope:]
(shape [tokens, heads, rope], strides (heads*(nope+rope), nope+rope, 1))
and on k_pe (a [tokens, 1, rope] slice of kv_a_proj_with_mqa's output).
RotaryEmbedding.forward_cpu calls torch.ops._C.rotary_embedding, whose CPU
kernel (csrc/cpu/pos_encoding.cpp) takes num_heads = query.size(-1) /
head_size (1 here) and the token stride from query.stride(-2) (the head
stride here, and 64 instead of kv_lora_rank + 64 for k_pe): it rotates
tokens·1 rows spaced one head apart, each at the position of the row's
index, and leaves the rest unrotated. The CUDA kernel handles these shapes
(vLLM PRs 12777, 18046); the CPU one does not. Any other rope_type routes
vLLM's DeepSeek model through DeepseekScalingRotaryEmbedding, which has no
CPU kernel and runs its PyTorch forward, correctly; a YaRN of factor 1 is
plain RoPE in transformers, vLLM and transmla alike.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def interleaved_rope(x, pos, theta):
    """Pairs (2i, 2i+1) of the last dim rotated by pos·theta^(-2i/d)."""
    import torch
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty(x.shape, dtype=torch.float64)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out


def op():
    import torch
    import vllm
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    torch.manual_seed(0)
    tokens, heads, nope, rope, latent, theta = 9, 4, 128, 64, 512, 10000.0
    pos = torch.arange(tokens)
    report = {"vllm": vllm.__version__}
    # enforce_eager=True (which the CPU build needs here) enables every
    # custom op: custom_ops ["all"], as the engine logs.
    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))):
        routes = {
            # deepseek_v2.py with rope_type default
            "default (RotaryEmbedding, CPU kernel)": {"rope_type": "default", "rope_theta": theta},
            # deepseek_v2.py with any other rope_type: deepseek_yarn
            "yarn factor 1 (DeepseekScalingRotaryEmbedding)": {
                "rope_type": "deepseek_yarn", "rope_theta": theta, "factor": 1.0,
                "original_max_position_embeddings": 256},
        }
        for name, params in routes.items():
            rot = get_rope(rope, max_position=256, rope_parameters=params, is_neox_style=False, dtype=torch.float32)
            q = torch.randn(tokens, heads, nope + rope)
            kv = torch.randn(tokens, latent + rope)
            want_q = interleaved_rope(q[..., nope:], pos, theta)
            want_k = interleaved_rope(kv[:, latent:].unsqueeze(1), pos, theta)
            q_work, kv_work = q.clone(), kv.clone()
            # As layers/mla.py calls it: slices in, results assigned back.
            q_pe, k_pe = rot(pos, q_work[..., nope:], kv_work[:, latent:].unsqueeze(1))
            q_work[..., nope:] = q_pe
            err = lambda got, want: float((got.double() - want).abs().max())
            report[name] = {
                "class": type(rot).__name__,
                "forward": rot._forward_method.__name__,
                "q_pe max error": err(q_work[..., nope:], want_q),
                "k_pe max error": err(k_pe, want_k),
                "q heads left unrotated": int(sum(bool((q_work[t, h, nope:] == q[t, h, nope:]).all())
                                                  for t in range(1, tokens) for h in range(heads))),
                "latent values overwritten": int((kv_work[:, :latent] != kv[:, :latent]).sum()),
            }
        # The same kernel on the contiguous 2-D layout Llama passes is right.
        rot = get_rope(rope, max_position=256, rope_parameters={"rope_type": "default", "rope_theta": theta},
                       is_neox_style=False, dtype=torch.float32)
        q = torch.randn(tokens, heads * rope)
        k = torch.randn(tokens, rope)
        q_out, k_out = rot(pos, q.clone(), k.clone())
        report["default, contiguous [tokens, heads*rope] (Llama's layout)"] = {
            "q max error": float((q_out.double().view(tokens, heads, rope)
                                  - interleaved_rope(q.view(tokens, heads, rope), pos, theta)).abs().max()),
            "k max error": float((k_out.double().view(tokens, 1, rope)
                                  - interleaved_rope(k.view(tokens, 1, rope), pos, theta)).abs().max()),
        }
    print(json.dumps(report, indent=2))


def model(work):
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    ids = [(i * 53 + 7) % 97 for i in range(64)]
    base = {"hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 97, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
            "q_lora_rank": None, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64,
            "first_k_dense_replace": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "n_group": 1, "topk_group": 1, "tie_word_embeddings": False}
    yarn1 = {"rope_type": "yarn", "factor": 1.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256}
    cases = [
        # name, kv_lora_rank, rope_parameters, MLA on, vLLM's CPU rotary op disabled
        ("MHA, plain RoPE", 64, None, False, False),
        ("MHA, plain RoPE, CPU rotary op disabled", 64, None, False, True),
        ("MHA, YaRN factor 1", 64, yarn1, False, False),
        ("CPU_MLA, plain RoPE", 512, None, True, False),
        ("CPU_MLA, YaRN factor 1", 512, yarn1, True, False),
    ]
    import numpy as np
    for name, dc, rp, mla, native in cases:
        cfg = dict(base, kv_lora_rank=dc)
        if rp:
            cfg["rope_parameters"] = rp
        path = os.path.join(work, f"ds-{dc}-{'yarn1' if rp else 'plain'}")
        if not os.path.exists(os.path.join(path, "logits.f32")):
            spec = {"arch": "DeepseekV3ForCausalLM", "dtype": "bfloat16", "seed": 1, "ids": ids, "config": cfg}
            subprocess.run([py, os.path.join(HERE, "hf.py"), "fixture", path, "--spec", json.dumps(spec)],
                           check=True, capture_output=True)
        env = dict(os.environ, VLLM_MLA_DISABLE="0" if mla else "1")
        cmd = [py, os.path.join(HERE, "vllm_check.py"), path, "--ctx", "128", "--ids", ",".join(map(str, ids))]
        if native:
            cmd.append("--native-rope")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in p.stdout.splitlines() if l.startswith("VLLM_CHECK_JSON ")]
        if not line:
            sys.exit(f"vllm_check.py failed for {name}:\n{p.stderr[-3000:]}")
        got = np.array(json.loads(line[0].split(" ", 1)[1])["prompt_logprobs"])
        lg = np.fromfile(os.path.join(path, "logits.f32"), dtype="<f4").reshape(len(ids), -1).astype(np.float64)
        m = lg.max(1, keepdims=True)
        lp = lg - m - np.log(np.exp(lg - m).sum(1, keepdims=True))
        want = np.array([lp[i - 1, ids[i]] for i in range(1, len(ids))])
        print(f"{name}: max |vLLM - transformers| prompt log-prob {np.abs(got - want).max():.4f}", flush=True)
    same_in_transformers(work)


def same_in_transformers(work):
    """transformers computes a YaRN of factor 1 as plain RoPE: the logits of
    the fixtures above (same seed, same weights) with and without it."""
    import numpy as np
    for dc in (64, 512):
        a, b = (np.fromfile(os.path.join(work, f"ds-{dc}-{k}", "logits.f32"), dtype="<f4") for k in ("plain", "yarn1"))
        print(f"transformers, kv_lora_rank {dc}: max |logits(plain) - logits(YaRN factor 1)| {np.abs(a - b).max():.3g}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "op":
        op()
    elif len(sys.argv) == 3 and sys.argv[1] == "model":
        model(sys.argv[2])
    else:
        sys.exit(__doc__)
