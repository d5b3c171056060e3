package model

import "fmt"

// The three GQA families share Llama's tensor layout and differ in which
// biases they carry and how they use a sliding window; DeepSeek-V3 (dense
// layers only) is the MLA layout conversions produce.
func init() {
	register(llama{})
	register(mistral{})
	register(qwen2{})
	register(deepseekV3{})
}

type llama struct{}

func (llama) Name() string { return "LlamaForCausalLM" }

func (llama) Normalize(c *Config, raw *rawConfig) error {
	c.SlidingWindow = 0 // Llama has no sliding window even if a key is present
	return nil
}

type mistral struct{}

func (mistral) Name() string { return "MistralForCausalLM" }

func (mistral) Normalize(c *Config, raw *rawConfig) error {
	// Mistral's projections never carry biases; the window comes from sliding_window.
	c.QKVBias, c.OBias = false, false
	return nil
}

type qwen2 struct{}

func (qwen2) Name() string { return "Qwen2ForCausalLM" }

func (qwen2) Normalize(c *Config, raw *rawConfig) error {
	// Qwen2 always has q/k/v biases and never an o_proj bias.
	c.QKVBias, c.OBias = true, false
	if raw.UseSlidingWindow != nil && *raw.UseSlidingWindow {
		return fmt.Errorf("use_sliding_window=true (per-layer windows after max_window_layers) is not supported")
	}
	c.SlidingWindow = 0
	return nil
}
