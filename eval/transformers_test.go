package eval_test

import (
	"context"
	"encoding/json"
	"math"
	"path/filepath"
	"testing"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/interoptest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
)

// fixtureSpec is what scripts/interop/hf.py fixture builds: a randomly
// initialised transformers model of Arch with Config, saved by
// save_pretrained as DType, and its float32 logits of IDs.
type fixtureSpec struct {
	Arch   string         `json:"arch"`
	Config map[string]any `json:"config"`
	DType  string         `json:"dtype"`
	Seed   int            `json:"seed"`
	IDs    []int          `json:"ids"`
}

// tiny is the shared shape of the fixtures: 2 layers, hidden 64, 4 query
// heads of 16, vocabulary 97; extra overrides or adds keys.
func tiny(kvHeads int, extra map[string]any) map[string]any {
	c := map[string]any{
		"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
		"num_attention_heads": 4, "num_key_value_heads": kvHeads, "head_dim": 16,
		"vocab_size": 97, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
		"tie_word_embeddings": false,
	}
	for k, v := range extra {
		c[k] = v
	}
	return c
}

func rope(typ string, params map[string]any) map[string]any {
	p := map[string]any{"rope_type": typ, "rope_theta": 10000.0}
	for k, v := range params {
		p[k] = v
	}
	return map[string]any{"rope_parameters": p}
}

func merge(ms ...map[string]any) map[string]any {
	out := map[string]any{}
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// deepseek is a dense DeepSeek-V3 config of the fixture shape: q_lora_rank
// null, one latent of 24 dims, RoPE key of 8, every layer dense.
func deepseek(extra map[string]any) map[string]any {
	c := tiny(4, merge(map[string]any{
		"q_lora_rank": nil, "kv_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
		"v_head_dim": 12, "first_k_dense_replace": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
		"moe_intermediate_size": 32, "n_group": 1, "topk_group": 1,
	}, extra))
	delete(c, "head_dim") // DeepseekV3Config sets it to qk_rope_head_dim
	// transformers normalizes the latent with eps 1e-6 whatever
	// rms_norm_eps says, vLLM and this project with rms_norm_eps (1e-5
	// differs by 2e-5 here); DeepSeek-V3 and stock exports use 1e-6.
	c["rms_norm_eps"] = 1e-6
	return c
}

// Every family the loader reads, as transformers itself builds and saves it
// (random weights of unit gain), must give transformers' float32 logits:
// biases, tied and untied heads, GQA ratios 1, 2 and 4, every rope_scaling
// the loader supports, Mistral's sliding window, DeepSeek-V3 with and
// without interleaved RoPE and attention biases; bf16 and f32 files.
func TestForwardMatchesTransformers(t *testing.T) {
	interoptest.Python(t)
	ids := make([]int, 40)
	for i := range ids {
		ids[i] = (i*53 + 7) % 97
	}
	llama3 := map[string]any{"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
	for _, tc := range []struct {
		name string
		spec fixtureSpec
	}{
		{"llama MHA untied f32", fixtureSpec{Arch: "LlamaForCausalLM", Config: tiny(4, nil), DType: "float32"}},
		{"llama GQA 2 tied bf16 with attention biases", fixtureSpec{Arch: "LlamaForCausalLM", Config: tiny(2, map[string]any{"tie_word_embeddings": true, "attention_bias": true}), DType: "bfloat16"}},
		{"llama GQA 4 linear", fixtureSpec{Arch: "LlamaForCausalLM", Config: tiny(1, rope("linear", map[string]any{"factor": 2.0})), DType: "float32"}},
		{"llama llama3 scaling bf16", fixtureSpec{Arch: "LlamaForCausalLM", Config: tiny(2, rope("llama3", llama3)), DType: "bfloat16"}},
		{"llama yarn", fixtureSpec{Arch: "LlamaForCausalLM", Config: tiny(2, rope("yarn", map[string]any{"factor": 4.0, "original_max_position_embeddings": 16})), DType: "float32"}},
		{"mistral sliding window 6", fixtureSpec{Arch: "MistralForCausalLM", Config: tiny(2, map[string]any{"sliding_window": 6}), DType: "float32"}},
		{"qwen2 GQA 2 tied bf16", fixtureSpec{Arch: "Qwen2ForCausalLM", Config: tiny(2, map[string]any{"tie_word_embeddings": true}), DType: "bfloat16"}},
		{"qwen2 GQA 4 untied", fixtureSpec{Arch: "Qwen2ForCausalLM", Config: tiny(1, nil), DType: "float32"}},
		{"deepseek-v3 dense interleaved", fixtureSpec{Arch: "DeepseekV3ForCausalLM", Config: deepseek(nil), DType: "float32"}},
		{"deepseek-v3 rotate-half, attention bias, tied bf16", fixtureSpec{Arch: "DeepseekV3ForCausalLM", Config: deepseek(map[string]any{"rope_interleave": false, "attention_bias": true, "tie_word_embeddings": true}), DType: "bfloat16"}},
		{"deepseek-v3 llama3 scaling", fixtureSpec{Arch: "DeepseekV3ForCausalLM", Config: deepseek(rope("llama3", llama3)), DType: "float32"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "hf")
			spec := tc.spec
			spec.IDs, spec.Seed = ids, len(tc.name)
			js, err := json.Marshal(spec)
			if err != nil {
				t.Fatal(err)
			}
			var made struct{ Shape []int }
			interoptest.HF(t, &made, "fixture", dir, "--spec", string(js))
			want := interoptest.ReadLogits(t, filepath.Join(dir, "logits.f32"))
			m, err := model.Load(context.Background(), dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			r, err := eval.NewRunner(m, kernels.NewNative(), len(ids))
			if err != nil {
				t.Fatal(err)
			}
			got, err := r.Forward(context.Background(), r.NewCache(), ids, true)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(want) || len(want) != made.Shape[0]*made.Shape[1] {
				t.Fatalf("%d logits, transformers gave %d (%v)", len(got), len(want), made.Shape)
			}
			V := m.Config.VocabSize
			var worst float64
			for p := range ids {
				worst = math.Max(worst, relErr(got[p*V:(p+1)*V], want[p*V:(p+1)*V]))
			}
			t.Logf("largest relative difference over %d positions: %.2e", len(ids), worst)
			if worst > 1e-5 {
				t.Errorf("logits differ from transformers' by %.3g (relative to the largest logit), want ≤ 1e-5", worst)
			}
		})
	}
}

// relErr is max |got − want| over max |want|.
func relErr(got, want []float32) float64 {
	var diff, scale float64
	for i := range want {
		diff = math.Max(diff, math.Abs(float64(got[i])-float64(want[i])))
		scale = math.Max(scale, math.Abs(float64(want[i])))
	}
	return diff / scale
}
