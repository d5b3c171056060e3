#!/usr/bin/env python3
"""Perplexity and tokens/s of a Llama/Qwen2 or converted DeepSeek-V3 (MLA)
checkpoint with PyTorch on the CPU.

A second, independent implementation of the forward pass (plain torch, no
transformers) to run beside `transmla eval` on the same machine. Token ids come
from `transmla tokenize --ids-out`, so both sides score the same windows. The
MLA attention follows transformers' DeepseekV3Attention: q_proj without bias
(unless the checkpoint has one), kv_a_layernorm with transformers' fixed
epsilon 1e-6 when present, interleaved RoPE rows de-interleaved before the
rotate-half rotation, softmax scale (qk_nope + qk_rope)^-1/2.

usage: torch_eval.py MODEL_DIR IDS_JSON [--ctx 1024] [--max-windows N] [--threads N]
Prints one JSON object: ppl, tokens_scored, windows, tokens_per_second, seconds.
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def read_safetensors(path):
    """Reads every tensor of one .safetensors file as float32."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        buf = bytearray(data[base + lo : base + hi])
        t = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]) if hi > lo else torch.empty(0)
        out[name] = t.reshape(info["shape"]).float()
    return out


def load(model_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    index = os.path.join(model_dir, "model.safetensors.index.json")
    w = {}
    if os.path.exists(index):
        for shard in sorted(set(json.load(open(index))["weight_map"].values())):
            w.update(read_safetensors(os.path.join(model_dir, shard)))
    else:
        w = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    return cfg, w


def rope_tables(cfg, head_dim, n):
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", None):
        sys.exit(f"torch_eval.py: rope scaling {kind!r} not implemented here")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(n).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def deinterleave(x):
    """[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...] on the last dim."""
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(*x.shape[:-1], d)


def mla_attention(cfg, w, p, h, cos, sin, mask):
    T = h.shape[0]
    H = cfg["num_attention_heads"]
    dn, dr, dv, dc = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    lin = lambda name, x: torch.nn.functional.linear(x, w[p + name + ".weight"], w.get(p + name + ".bias"))
    q = lin("self_attn.q_proj", h).view(T, H, dn + dr).transpose(0, 1)
    q_pass, q_rot = q[..., :dn], q[..., dn:]
    a = lin("self_attn.kv_a_proj_with_mqa", h)
    c, k_rot = a[:, :dc], a[:, dc:]
    if p + "self_attn.kv_a_layernorm.weight" in w:
        c = rmsnorm(c, w[p + "self_attn.kv_a_layernorm.weight"], 1e-6)
    kv = lin("self_attn.kv_b_proj", c).view(T, H, dn + dv).transpose(0, 1)
    k_pass, v = kv[..., :dn], kv[..., dn:]
    k_rot = k_rot.view(1, T, dr)
    if cfg.get("rope_interleave", True):
        q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    k_rot = (k_rot * cos + rotate_half(k_rot) * sin).expand(H, T, dr)
    qs = torch.cat([q_pass, q_rot], dim=-1)
    ks = torch.cat([k_pass, k_rot], dim=-1)
    s = qs @ ks.transpose(1, 2) * (dn + dr) ** -0.5 + mask
    out = torch.softmax(s, dim=-1) @ v
    return lin("self_attn.o_proj", out.transpose(0, 1).reshape(T, H * dv))


def forward(cfg, w, ids, cos, sin):
    D = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    G = cfg.get("num_key_value_heads", H)
    hd = cfg.get("head_dim") or D // H
    eps = cfg.get("rms_norm_eps", 1e-6)
    T = ids.shape[0]
    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        lin = lambda name, h: torch.nn.functional.linear(h, w[p + name + ".weight"], w.get(p + name + ".bias"))
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        if cfg.get("model_type") == "deepseek_v3":
            x = x + mla_attention(cfg, w, p, h, cos, sin, mask)
            h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
            x = x + lin("mlp.down_proj", torch.nn.functional.silu(lin("mlp.gate_proj", h)) * lin("mlp.up_proj", h))
            continue
        q = lin("self_attn.q_proj", h).view(T, H, hd).transpose(0, 1)
        k = lin("self_attn.k_proj", h).view(T, G, hd).transpose(0, 1)
        v = lin("self_attn.v_proj", h).view(T, G, hd).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(H // G, dim=0)
        v = v.repeat_interleave(H // G, dim=0)
        s = q @ k.transpose(1, 2) / math.sqrt(hd) + mask
        a = torch.softmax(s, dim=-1) @ v
        x = x + lin("self_attn.o_proj", a.transpose(0, 1).reshape(T, H * hd))
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + lin("mlp.down_proj", torch.nn.functional.silu(lin("mlp.gate_proj", h)) * lin("mlp.up_proj", h))
    x = rmsnorm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ids")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg, w = load(a.model)
    ids = torch.tensor(json.load(open(a.ids)), dtype=torch.long)
    windows = len(ids) // a.ctx
    if a.max_windows:
        windows = min(windows, a.max_windows)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("model_type") == "deepseek_v3":
        hd = cfg["qk_rope_head_dim"]  # RoPE covers the decoupled key only
    cos, sin = rope_tables(cfg, hd, a.ctx)
    nll = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for k in range(windows):
            win = ids[k * a.ctx : (k + 1) * a.ctx]
            logits = forward(cfg, w, win, cos, sin)
            logp = torch.log_softmax(logits[:-1].double(), dim=-1)
            nll -= logp.gather(1, win[1:, None]).sum().item()
    secs = time.perf_counter() - start
    scored = windows * (a.ctx - 1)
    print(json.dumps({
        "ppl": math.exp(nll / scored), "tokens_scored": scored, "windows": windows,
        "seconds": secs, "tokens_per_second": windows * a.ctx / secs,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
