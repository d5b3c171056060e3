package model

import (
	"strings"
	"testing"

	"github.com/transmla/transmla/rope"
)

const llamaBase = `"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
 "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 100`

func TestParseConfig(t *testing.T) {
	for _, tc := range []struct {
		name  string
		json  string
		check func(t *testing.T, c Config)
	}{
		{"derived head_dim and defaults", `{` + llamaBase + `}`, func(t *testing.T, c Config) {
			if c.HeadDim != 8 || c.Rope.Dim != 8 || c.Rope.Theta != 10000 || c.RMSNormEps != 1e-6 || c.TieWordEmbeddings || c.QKVBias {
				t.Errorf("got %+v", c)
			}
			if got := c.KVCacheValuesPerToken(); got != 2*2*8*2 {
				t.Errorf("KV values per token %d, want 64", got)
			}
		}},
		{"explicit head_dim", `{` + llamaBase + `, "head_dim": 16}`, func(t *testing.T, c Config) {
			if c.HeadDim != 16 {
				t.Errorf("head_dim %d, want 16", c.HeadDim)
			}
		}},
		{"rope_parameters (transformers 5)", `{` + llamaBase + `, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}`, func(t *testing.T, c Config) {
			if c.Rope.Theta != 500000 || c.Rope.Scaling.Type != "default" {
				t.Errorf("rope %+v", c.Rope)
			}
		}},
		{"llama3 scaling under rope_scaling", `{` + llamaBase + `, "rope_theta": 500000, "max_position_embeddings": 131072,
			"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}`,
			func(t *testing.T, c Config) {
				s := c.Rope.Scaling
				if s.Type != "llama3" || s.Factor != 8 || s.OriginalMaxPositionEmbeddings != 8192 {
					t.Errorf("scaling %+v", s)
				}
			}},
		{"linear scaling with legacy type key", `{` + llamaBase + `, "rope_scaling": {"type": "linear", "factor": 2.0}}`, func(t *testing.T, c Config) {
			if c.Rope.Scaling.Type != "linear" || c.Rope.Scaling.Factor != 2 {
				t.Errorf("scaling %+v", c.Rope.Scaling)
			}
		}},
		{"yarn takes max_position_embeddings as original", `{` + llamaBase + `, "max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}`, func(t *testing.T, c Config) {
			if c.Rope.Scaling.OriginalMaxPositionEmbeddings != 4096 {
				t.Errorf("scaling %+v", c.Rope.Scaling)
			}
		}},
		{"identity yarn (factor 1) is no scaling", `{` + llamaBase + `, "rope_scaling": {"rope_type": "yarn", "factor": 1, "original_max_position_embeddings": 4096}}`, func(t *testing.T, c Config) {
			if c.Rope.Scaling != (rope.Scaling{}) {
				t.Errorf("scaling %+v, want none", c.Rope.Scaling)
			}
		}},
		{"identity linear (factor 1) is no scaling", `{` + llamaBase + `, "rope_scaling": {"type": "linear", "factor": 1.0}}`, func(t *testing.T, c Config) {
			if c.Rope.Scaling != (rope.Scaling{}) {
				t.Errorf("scaling %+v, want none", c.Rope.Scaling)
			}
		}},
		{"identity llama3 (factor 1) is no scaling", `{` + llamaBase + `, "rope_parameters": {"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 10000.0}}`, func(t *testing.T, c Config) {
			if c.Rope.Scaling != (rope.Scaling{}) {
				t.Errorf("scaling %+v, want none", c.Rope.Scaling)
			}
		}},
		{"yarn of factor 1 with an attention factor scales", `{` + llamaBase + `, "max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 1, "attention_factor": 0.5}}`, func(t *testing.T, c Config) {
			if c.Rope.Scaling.Type != "yarn" || c.Rope.Scaling.AttentionFactor != 0.5 {
				t.Errorf("scaling %+v, want the yarn kept", c.Rope.Scaling)
			}
		}},
		{"tied, eps, eos list, attention_bias", `{` + llamaBase + `, "tie_word_embeddings": true, "rms_norm_eps": 1e-5, "eos_token_id": [1, 2], "bos_token_id": 1, "attention_bias": true}`, func(t *testing.T, c Config) {
			if !c.TieWordEmbeddings || c.RMSNormEps != 1e-5 || len(c.EOSTokenIDs) != 2 || c.BOSTokenID != 1 || !c.QKVBias || !c.OBias {
				t.Errorf("got %+v", c)
			}
		}},
		{"qwen2 always has q/k/v biases", `{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
			"num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 100, "rope_theta": 1000000.0, "sliding_window": 4096, "use_sliding_window": false}`,
			func(t *testing.T, c Config) {
				if !c.QKVBias || c.OBias || c.SlidingWindow != 0 || c.Rope.Theta != 1e6 {
					t.Errorf("got %+v", c)
				}
			}},
		{"mistral sliding window", `{"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
			"num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 100, "sliding_window": 4096}`,
			func(t *testing.T, c Config) {
				if c.SlidingWindow != 4096 {
					t.Errorf("sliding window %d, want 4096", c.SlidingWindow)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig("config.json", []byte(tc.json))
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name, json, want string
	}{
		{"not json", `{`, "config.json: invalid JSON"},
		{"unsupported architecture", `{"architectures": ["GPT2LMHeadModel"]}`, `unsupported architecture "GPT2LMHeadModel" (supported: DeepseekV3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)`},
		{"no architectures", `{"hidden_size": 8}`, `no "architectures"`},
		{"heads not a multiple", `{` + strings.Replace(llamaBase, `"num_key_value_heads": 2`, `"num_key_value_heads": 3`, 1) + `}`, "not a multiple of num_key_value_heads 3"},
		{"missing hidden size", `{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 8}`, "hidden_size must be positive"},
		{"bad scaling", `{` + llamaBase + `, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}`, `unsupported rope scaling type "dynamic"`},
		{"bad activation", `{` + llamaBase + `, "hidden_act": "gelu"}`, `hidden_act "gelu" is not supported`},
		{"qwen2 sliding", `{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
			"num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 100, "use_sliding_window": true, "sliding_window": 8}`, "use_sliding_window=true"},
		{"wrong JSON type", `{` + llamaBase + `, "rope_scaling": "linear"}`, `config.json: key "rope_scaling": want an object, got a JSON string`},
		{"number as string", `{` + llamaBase + `, "head_dim": "128"}`, `config.json: key "head_dim": want a number, got a JSON string`},
		{"bad eos", `{` + llamaBase + `, "eos_token_id": "x"}`, "eos_token_id"},
		{"huge head_dim", `{` + llamaBase + `, "head_dim": 100000000000}`, "head_dim 100000000000 exceeds 65536"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig("config.json", []byte(tc.json))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}
