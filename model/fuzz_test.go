package model

import (
	"strings"
	"testing"
)

// FuzzParseConfig feeds arbitrary bytes to the config parser: it must
// return a config or a one-line error naming the file, never panic, and an
// accepted config must satisfy the invariants the forward pass relies on.
func FuzzParseConfig(f *testing.F) {
	for _, seed := range []string{
		`{` + llamaBase + `}`,
		`{` + llamaBase + `, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4}}`,
		`{` + llamaBase + `, "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 2048}, "partial_rotary_factor": 0.5}`,
		`{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 0}`,
		`{"architectures": ["MistralForCausalLM"], "head_dim": -4, "eos_token_id": [1, "x"]}`,
		`[]`, `null`, `{"architectures": [7]}`,
		`{` + dsBase + `, "attention_bias": true, "transmla": {"format": "exact", "kv_a_layernorm": false, "q_bias": true}}`,
		`{` + dsBase + `, "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1, "mscale_all_dim": 1, "original_max_position_embeddings": 64}}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig("config.json", data)
		if err != nil {
			// The CLI prints errors as one line naming the file.
			if msg := err.Error(); !strings.HasPrefix(msg, "config.json: ") || strings.Contains(msg, "\n") {
				t.Fatalf("error %q is not one line naming the file", msg)
			}
			return
		}
		if c.NumKVHeads <= 0 || c.NumHeads%c.NumKVHeads != 0 || c.HeadDim <= 0 || c.Rope.Dim <= 0 || c.Rope.Dim > c.HeadDim || c.Rope.Dim%2 != 0 {
			t.Fatalf("accepted an inconsistent config: %+v", c)
		}
		if m := c.MLA; m != nil && (c.NumKVHeads != c.NumHeads || c.HeadDim != m.QKNopeHeadDim+m.QKRopeHeadDim || c.Rope.Dim != m.QKRopeHeadDim || m.KVLoraRank <= 0 || m.VHeadDim <= 0) {
			t.Fatalf("accepted an inconsistent MLA config: %+v %+v", c, *m)
		}
	})
}
