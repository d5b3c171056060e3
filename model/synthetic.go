package model

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"

	"github.com/transmla/transmla/internal/atomicfile"
	"github.com/transmla/transmla/safetensors"
)

// SyntheticSpec describes a small deterministic GQA checkpoint that the
// project generates itself, so that every command can run without
// downloading weights.
type SyntheticSpec struct {
	// Layers, Hidden, Heads, KVHeads, HeadDim, Intermediate and Vocab are
	// the config.json sizes of the same meaning.
	Layers, Hidden, Heads, KVHeads, HeadDim, Intermediate, Vocab int
	// RopeTheta is the RoPE base.
	RopeTheta float64
	// MaxPositions is max_position_embeddings.
	MaxPositions int
	// QKVBias adds q/k/v biases (Qwen2-style) and writes a Qwen2 config.
	QKVBias bool
	// DType is the stored weight dtype.
	DType safetensors.DType
	// Seed makes the weights reproducible.
	Seed uint64
	// Spectra gives the attention projections the decaying, head-overlapping
	// spectra of trained models (see SyntheticLlama8B) instead of independent
	// rows, and draws every tensor lazily, in parallel, from random streams
	// of its own, so that checkpoints of billions of weights are written
	// in one pass with one tensor in memory. It changes every weight.
	Spectra bool
}

// DefaultSynthetic is the built-in default checkpoint: a Llama with 4 query
// heads per KV head and a byte-level vocabulary.
func DefaultSynthetic() SyntheticSpec {
	return SyntheticSpec{
		Layers: 4, Hidden: 256, Heads: 8, KVHeads: 2, HeadDim: 32, Intermediate: 688,
		Vocab: 257, RopeTheta: 10000, MaxPositions: 2048, DType: safetensors.BF16, Seed: 1,
	}
}

// WriteSynthetic writes config.json and model.safetensors for spec into dir,
// which must exist. Weights are Gaussian with a per-row decay, so that
// projections have the decaying spectra of trained models rather than flat
// ones. The same spec always gives the same bytes.
func WriteSynthetic(ctx context.Context, dir string, spec SyntheticSpec) error {
	if spec.Heads%spec.KVHeads != 0 || spec.HeadDim%2 != 0 {
		return fmt.Errorf("synthetic model: heads %d must be a multiple of kv heads %d and head_dim %d even", spec.Heads, spec.KVHeads, spec.HeadDim)
	}
	arch, modelType := "LlamaForCausalLM", "llama"
	if spec.QKVBias {
		arch, modelType = "Qwen2ForCausalLM", "qwen2"
	}
	dtypeName := map[safetensors.DType]string{safetensors.BF16: "bfloat16", safetensors.F16: "float16", safetensors.F32: "float32"}[spec.DType]
	if dtypeName == "" {
		return fmt.Errorf("synthetic model: dtype %v is not a float dtype", spec.DType)
	}
	cfg := map[string]any{
		"architectures":           []string{arch},
		"model_type":              modelType,
		"hidden_size":             spec.Hidden,
		"intermediate_size":       spec.Intermediate,
		"num_hidden_layers":       spec.Layers,
		"num_attention_heads":     spec.Heads,
		"num_key_value_heads":     spec.KVHeads,
		"head_dim":                spec.HeadDim,
		"vocab_size":              spec.Vocab,
		"max_position_embeddings": spec.MaxPositions,
		"rms_norm_eps":            1e-5,
		"rope_theta":              spec.RopeTheta,
		"hidden_act":              "silu",
		"tie_word_embeddings":     false,
		"attention_bias":          false,
		"bos_token_id":            spec.Vocab - 1,
		"eos_token_id":            spec.Vocab - 1,
		"torch_dtype":             dtypeName,
	}
	cfgJSON, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, "config.json"), append(cfgJSON, '\n'), 0o644); err != nil {
		return err
	}

	if spec.Spectra {
		return writeSpectra(ctx, dir, spec)
	}
	rng := rand.New(rand.NewPCG(spec.Seed, 0x7472616e736d6c61))
	var specs []safetensors.TensorSpec
	add := func(name string, shape []int, data []float32) {
		specs = append(specs, safetensors.Float32Tensor(name, spec.DType, shape, data))
	}
	matrix := func(out, in int) []float32 {
		w := make([]float32, out*in)
		scale := 1 / math.Sqrt(float64(in))
		for r := range out {
			decay := scale / math.Sqrt(1+float64(r)/8)
			for c := range in {
				w[r*in+c] = float32(rng.NormFloat64() * decay)
			}
		}
		// Shuffle rows so the decay is not aligned with heads or RoPE pairs.
		rng.Shuffle(out, func(i, j int) {
			for c := range in {
				w[i*in+c], w[j*in+c] = w[j*in+c], w[i*in+c]
			}
		})
		return w
	}
	norm := func(n int) []float32 {
		w := make([]float32, n)
		for i := range w {
			w[i] = float32(1 + 0.1*rng.NormFloat64())
		}
		return w
	}
	vector := func(n int, std float64) []float32 {
		b := make([]float32, n)
		for i := range b {
			b[i] = float32(std * rng.NormFloat64())
		}
		return b
	}
	D, q, kv := spec.Hidden, spec.Heads*spec.HeadDim, spec.KVHeads*spec.HeadDim
	add("model.embed_tokens.weight", []int{spec.Vocab, D}, vector(spec.Vocab*D, 1))
	for i := range spec.Layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		add(p+"input_layernorm.weight", []int{D}, norm(D))
		add(p+"self_attn.q_proj.weight", []int{q, D}, matrix(q, D))
		add(p+"self_attn.k_proj.weight", []int{kv, D}, matrix(kv, D))
		add(p+"self_attn.v_proj.weight", []int{kv, D}, matrix(kv, D))
		if spec.QKVBias {
			add(p+"self_attn.q_proj.bias", []int{q}, vector(q, 0.1))
			add(p+"self_attn.k_proj.bias", []int{kv}, vector(kv, 0.1))
			add(p+"self_attn.v_proj.bias", []int{kv}, vector(kv, 0.1))
		}
		add(p+"self_attn.o_proj.weight", []int{D, q}, matrix(D, q))
		add(p+"post_attention_layernorm.weight", []int{D}, norm(D))
		add(p+"mlp.gate_proj.weight", []int{spec.Intermediate, D}, matrix(spec.Intermediate, D))
		add(p+"mlp.up_proj.weight", []int{spec.Intermediate, D}, matrix(spec.Intermediate, D))
		add(p+"mlp.down_proj.weight", []int{D, spec.Intermediate}, matrix(D, spec.Intermediate))
	}
	add("model.norm.weight", []int{D}, norm(D))
	add("lm_head.weight", []int{spec.Vocab, D}, matrix(spec.Vocab, D))
	return safetensors.WriteCheckpoint(ctx, dir, specs, safetensors.WriteOptions{
		Metadata: map[string]string{"format": "pt", "generator": "transmla synthetic"},
	})
}
