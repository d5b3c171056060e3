package model

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"slices"

	"github.com/transmla/transmla/rope"
)

// MLAConfig describes Multi-head Latent Attention in DeepSeek-V3's form
// (q_lora_rank null: queries come straight from the hidden state). Each
// token caches one latent c (KVLoraRank values) and one RoPE key shared by
// all heads (QKRopeHeadDim values) per layer.
type MLAConfig struct {
	// KVLoraRank is the latent width d_c (kv_lora_rank).
	KVLoraRank int
	// QKRopeHeadDim is the decoupled RoPE width d_r (qk_rope_head_dim).
	QKRopeHeadDim int
	// QKNopeHeadDim is the position-free part of each query/key head.
	QKNopeHeadDim int
	// VHeadDim is the width of each value head (v_head_dim).
	VHeadDim int
	// KVANorm says the latent goes through an RMSNorm (kv_a_layernorm)
	// before kv_b_proj, as stock DeepSeek-V3 loaders always do. The exact
	// export has none.
	KVANorm bool
	// QBias and KVABias say whether q_proj and kv_a_proj_with_mqa carry a
	// bias (exact exports of sources with q/k/v biases).
	QBias, KVABias bool
	// RopeInterleave says the RoPE rows are stored as interleaved pairs
	// (2i, 2i+1), DeepSeek-V3's default; otherwise as rotate-half halves.
	RopeInterleave bool
	// LatentPad is how many zero latent dims the checkpoint stores beyond
	// KVLoraRank, the dims that carry information: config.json's
	// kv_lora_rank is KVLoraRank + LatentPad and transmla.latent_rank is
	// KVLoraRank (see pad.go). In memory the latent is never padded.
	LatentPad int
	// RopeInvFreq, when not nil, replaces the standard frequencies of
	// Config.Rope for the d_r/2 RoPE pairs. Only in-memory models built by
	// the converter's exactness anchor use it; no file format carries it.
	RopeInvFreq []float64
}

// AttentionScale multiplies the attention scores: 1/sqrt(head_dim) for GQA;
// DeepSeek-V3's 1/sqrt(qk_nope+qk_rope) for MLA, times mscale² when YaRN
// scaling sets mscale_all_dim, as its loaders compute it.
func (c Config) AttentionScale() float64 {
	if c.MLA == nil {
		return 1 / math.Sqrt(float64(c.HeadDim))
	}
	scale := 1 / math.Sqrt(float64(c.MLA.QKNopeHeadDim+c.MLA.QKRopeHeadDim))
	if s := c.Rope.Scaling; s.Type == "yarn" && s.MScaleAllDim > 0 && s.Factor > 1 {
		ms := 0.1*s.MScaleAllDim*math.Log(s.Factor) + 1
		scale *= ms * ms
	}
	return scale
}

// MLALayer holds one layer's MLA projections; the output projection stays
// in Layer.O (hidden × heads·v_head_dim).
type MLALayer struct {
	// Q is q_proj: heads·(nope+rope) × hidden, per head [q_nope; q_rope].
	Q Linear
	// KVA is kv_a_proj_with_mqa: (d_c + d_r) × hidden, [latent; RoPE key].
	KVA Linear
	// KVANorm is kv_a_layernorm's weight (d_c), nil without the norm.
	KVANorm []float32
	// KVB is kv_b_proj: heads·(nope+v) × d_c, per head [W_UK; W_UV].
	KVB Linear
}

// transMLAMeta is the "transmla" object our exporter writes into
// config.json: which optional MLA tensors the checkpoint carries. Other keys
// of the object are metadata and ignored here.
type transMLAMeta struct {
	// Format is "exact" or "deepseek-v3-stock" (informational).
	Format string `json:"format"`
	// KVALayernorm false says there is no kv_a_layernorm (exact export).
	KVALayernorm *bool `json:"kv_a_layernorm"`
	// QBias, KVABias and OBias override what attention_bias implies.
	QBias   *bool `json:"q_bias"`
	KVABias *bool `json:"kv_a_bias"`
	OBias   *bool `json:"o_bias"`
	// LatentRank, when below kv_lora_rank, says the latent dims beyond it
	// are zero padding (MLAConfig.LatentPad).
	LatentRank *int `json:"latent_rank"`
}

// deepseekV3 is DeepseekV3ForCausalLM restricted to what conversions
// produce: full q_proj (q_lora_rank null), one latent shared by all heads,
// dense MLPs in every layer.
type deepseekV3 struct{}

func (deepseekV3) Name() string { return "DeepseekV3ForCausalLM" }

// Transformers' defaults for keys a DeepSeek-V3 config.json may omit.
const (
	defaultRoutedExperts      = 256
	defaultFirstKDenseReplace = 3
)

func (deepseekV3) Normalize(c *Config, raw *rawConfig) error {
	if q := bytes.TrimSpace(raw.QLoraRank); len(q) > 0 && string(q) != "null" {
		return fmt.Errorf("q_lora_rank %s: only q_lora_rank null (one full q_proj) is supported", oneLine(q))
	}
	if c.NumKVHeads != c.NumHeads {
		return fmt.Errorf("num_key_value_heads %d must equal num_attention_heads %d (DeepSeek-V3 convention)", c.NumKVHeads, c.NumHeads)
	}
	experts := defaultRoutedExperts
	if e := bytes.TrimSpace(raw.NRoutedExperts); len(e) > 0 {
		experts = 0 // null: no experts
		if string(e) != "null" {
			if err := json.Unmarshal(e, &experts); err != nil {
				return fmt.Errorf("n_routed_experts: want an integer or null, got %s", oneLine(e))
			}
		}
	}
	firstDense := defaultFirstKDenseReplace
	if raw.FirstKDenseReplace != nil {
		firstDense = *raw.FirstKDenseReplace
	}
	if experts > 0 && firstDense < c.NumLayers {
		return fmt.Errorf("MoE layers are not supported: n_routed_experts %d and first_k_dense_replace %d < num_hidden_layers %d", experts, firstDense, c.NumLayers)
	}
	sizes := []struct {
		key string
		v   *int
	}{
		{"kv_lora_rank", raw.KVLoraRank},
		{"qk_rope_head_dim", raw.QKRopeHeadDim},
		{"qk_nope_head_dim", raw.QKNopeHeadDim},
		{"v_head_dim", raw.VHeadDim},
	}
	for _, s := range sizes {
		if s.v == nil {
			return fmt.Errorf("%s is missing", s.key)
		}
	}
	m := &MLAConfig{
		KVLoraRank:     *raw.KVLoraRank,
		QKRopeHeadDim:  *raw.QKRopeHeadDim,
		QKNopeHeadDim:  *raw.QKNopeHeadDim,
		VHeadDim:       *raw.VHeadDim,
		RopeInterleave: raw.RopeInterleave == nil || *raw.RopeInterleave,
		KVANorm:        true,
	}
	// head_dim in DeepSeek-V3 configs is the RoPE width; a head's query/key
	// width is nope + rope.
	c.HeadDim = m.QKNopeHeadDim + m.QKRopeHeadDim
	rp, err := raw.ropeParams(m.QKRopeHeadDim)
	if err != nil {
		return err
	}
	rp.Dim = m.QKRopeHeadDim // RoPE covers exactly the rope part
	c.Rope = rp
	// Transformers gives kv_a_proj_with_mqa and o_proj attention_bias, but
	// never q_proj when q_lora_rank is null; our exporter states each bias.
	bias := raw.AttentionBias != nil && *raw.AttentionBias
	m.KVABias, c.OBias = bias, bias
	if meta := raw.TransMLA; meta != nil {
		if meta.KVALayernorm != nil {
			m.KVANorm = *meta.KVALayernorm
		}
		if meta.QBias != nil {
			m.QBias = *meta.QBias
		}
		if meta.KVABias != nil {
			m.KVABias = *meta.KVABias
		}
		if meta.OBias != nil {
			c.OBias = *meta.OBias
		}
		if lr := meta.LatentRank; lr != nil {
			if *lr <= 0 || *lr > m.KVLoraRank {
				return fmt.Errorf("transmla.latent_rank %d must be in [1, kv_lora_rank %d]", *lr, m.KVLoraRank)
			}
			m.LatentPad, m.KVLoraRank = m.KVLoraRank-*lr, *lr
		}
	}
	c.QKVBias, c.MLPBias, c.SlidingWindow = false, false, 0
	c.MLA = m
	return nil
}

// validateMLA checks the MLA sizes against each other and the head layout.
func (c Config) validateMLA() error {
	m := c.MLA
	if m.KVLoraRank <= 0 || m.VHeadDim <= 0 || m.QKNopeHeadDim < 0 || m.LatentPad < 0 {
		return fmt.Errorf("kv_lora_rank %d and v_head_dim %d must be positive and qk_nope_head_dim %d and the latent padding %d not negative", m.KVLoraRank, m.VHeadDim, m.QKNopeHeadDim, m.LatentPad)
	}
	if m.QKRopeHeadDim <= 0 || m.QKRopeHeadDim%2 != 0 {
		return fmt.Errorf("qk_rope_head_dim %d must be positive and even", m.QKRopeHeadDim)
	}
	if c.NumKVHeads != c.NumHeads {
		return fmt.Errorf("MLA: num_key_value_heads %d must equal num_attention_heads %d", c.NumKVHeads, c.NumHeads)
	}
	if c.HeadDim != m.QKNopeHeadDim+m.QKRopeHeadDim || c.Rope.Dim != m.QKRopeHeadDim {
		return fmt.Errorf("MLA: head_dim %d and rotary dimension %d must be qk_nope+qk_rope = %d and qk_rope = %d", c.HeadDim, c.Rope.Dim, m.QKNopeHeadDim+m.QKRopeHeadDim, m.QKRopeHeadDim)
	}
	if m.RopeInvFreq != nil && len(m.RopeInvFreq) != m.QKRopeHeadDim/2 {
		return fmt.Errorf("MLA: %d RoPE frequencies for qk_rope_head_dim %d (want %d)", len(m.RopeInvFreq), m.QKRopeHeadDim, m.QKRopeHeadDim/2)
	}
	return nil
}

// Validate checks c as ParseConfig does, for configs built in memory (by the
// converter) rather than parsed.
func (c Config) Validate() error { return c.validate() }

// DeepSeekV3Config returns the config.json (indented, keys sorted, newline
// at the end) of the MLA config c in the layout of transformers'
// DeepseekV3ForCausalLM: top-level rope_theta and rope_scaling
// (transformers 4; plain RoPE as an identity YaRN, see exportScaling),
// head_dim = qk_rope_head_dim (what its RoPE init reads), and every layer
// dense: first_k_dense_replace = num_hidden_layers with one nominal expert
// so that loaders that size routers still accept it. Every
// key of extra is added at the top level; extra may override torch_dtype
// (default "bfloat16"), and its "transmla" object, if any, is merged with
// the kv_a_layernorm, q_bias, kv_a_bias and o_bias flags that c implies, so
// that ParseConfig gives c back.
func DeepSeekV3Config(c Config, extra map[string]any) ([]byte, error) {
	if c.MLA == nil {
		return nil, fmt.Errorf("deepseek-v3 config: %s config has no MLA part", c.Architecture)
	}
	if c.MLA.RopeInvFreq != nil {
		return nil, fmt.Errorf("deepseek-v3 config: custom RoPE frequencies cannot be written to config.json")
	}
	switch {
	case c.MLPBias:
		return nil, fmt.Errorf("deepseek-v3 config: MLP biases (mlp_bias) cannot be expressed")
	case c.SlidingWindow != 0:
		return nil, fmt.Errorf("deepseek-v3 config: a sliding window (sliding_window %d) cannot be expressed", c.SlidingWindow)
	case c.HiddenAct != "silu":
		return nil, fmt.Errorf("deepseek-v3 config: hidden_act %q cannot be expressed", c.HiddenAct)
	}
	c.Architecture = deepseekV3{}.Name()
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("deepseek-v3 config: %w", err)
	}
	m := c.MLA
	var bos any
	if c.BOSTokenID >= 0 {
		bos = c.BOSTokenID
	}
	var eos any
	switch len(c.EOSTokenIDs) {
	case 0:
	case 1:
		eos = c.EOSTokenIDs[0]
	default:
		eos = slices.Clone(c.EOSTokenIDs)
	}
	out := map[string]any{
		"architectures":           []string{c.Architecture},
		"model_type":              "deepseek_v3",
		"hidden_size":             c.HiddenSize,
		"intermediate_size":       c.IntermediateSize,
		"moe_intermediate_size":   c.IntermediateSize,
		"num_hidden_layers":       c.NumLayers,
		"num_attention_heads":     c.NumHeads,
		"num_key_value_heads":     c.NumHeads,
		"kv_lora_rank":            m.storedLatent(),
		"q_lora_rank":             nil,
		"qk_rope_head_dim":        m.QKRopeHeadDim,
		"qk_nope_head_dim":        m.QKNopeHeadDim,
		"v_head_dim":              m.VHeadDim,
		"head_dim":                m.QKRopeHeadDim,
		"n_routed_experts":        1,
		"n_shared_experts":        1,
		"num_experts_per_tok":     1,
		"n_group":                 1,
		"topk_group":              1,
		"first_k_dense_replace":   c.NumLayers,
		"vocab_size":              c.VocabSize,
		"max_position_embeddings": c.MaxPositionEmbeddings,
		"rms_norm_eps":            c.RMSNormEps,
		"rope_theta":              c.Rope.Theta,
		"rope_scaling":            scalingJSON(exportScaling(c.Rope.Scaling, c.MaxPositionEmbeddings)),
		"rope_interleave":         m.RopeInterleave,
		// Transformers reads attention_bias for kv_a_proj_with_mqa and o_proj.
		"attention_bias":      m.KVABias && c.OBias,
		"tie_word_embeddings": c.TieWordEmbeddings,
		"hidden_act":          "silu",
		"bos_token_id":        bos,
		"eos_token_id":        eos,
		"torch_dtype":         "bfloat16",
	}
	meta := map[string]any{}
	for k, v := range extra {
		switch k {
		case "transmla":
			// Round-trip through JSON so that a struct works as well as a map.
			b, err := json.Marshal(v)
			if err != nil {
				return nil, fmt.Errorf("deepseek-v3 config: extra key \"transmla\": %w", err)
			}
			if err := json.Unmarshal(b, &meta); err != nil || meta == nil {
				return nil, fmt.Errorf("deepseek-v3 config: extra key \"transmla\" must be an object, got %s", b)
			}
		case "torch_dtype":
			out[k] = v
		default:
			if _, dup := out[k]; dup {
				return nil, fmt.Errorf("deepseek-v3 config: extra key %q would replace a key derived from the model config", k)
			}
			out[k] = v
		}
	}
	// In a fixed order, so that the error names the same flag every time.
	for _, f := range []struct {
		key string
		v   bool
	}{{"kv_a_layernorm", m.KVANorm}, {"q_bias", m.QBias}, {"kv_a_bias", m.KVABias}, {"o_bias", c.OBias}} {
		if old, ok := meta[f.key]; ok && old != f.v {
			return nil, fmt.Errorf("deepseek-v3 config: extra transmla.%s = %v contradicts the model config (%v)", f.key, old, f.v)
		}
		meta[f.key] = f.v
	}
	if m.LatentPad > 0 {
		if old, ok := meta["latent_rank"]; ok && old != m.KVLoraRank {
			return nil, fmt.Errorf("deepseek-v3 config: extra transmla.latent_rank = %v contradicts the model config (%d)", old, m.KVLoraRank)
		}
		meta["latent_rank"] = m.KVLoraRank
	}
	out["transmla"] = meta
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("deepseek-v3 config: %w", err)
	}
	return append(b, '\n'), nil
}

// exportScaling is the rope_scaling that a DeepSeek-V3 config.json declares
// for s: s itself, or for plain RoPE a YaRN of factor 1 over the whole
// context, which every loader computes as plain RoPE (frequencies divided
// by 1, attention factor and mscale 1; ParseConfig reads it back as no
// scaling). The reason is vLLM 0.32 on the CPU: its DeepSeek model rotates
// q_pe and k_pe, per-head slices of q and of kv_a_proj_with_mqa's output,
// and for rope_type default it does so through the CPU rotary_embedding
// kernel, which reads such a [tokens, heads, d_r] slice as one head per
// token spaced by the head stride, so it rotates the wrong rows at the
// wrong positions (README, "Measured in the engines"). Any other
// rope_type sends vLLM's DeepSeek model through its YaRN rotary class,
// whose CPU forward is plain PyTorch and right.
func exportScaling(s rope.Scaling, maxPos int) rope.Scaling {
	if s.Type != "" && s.Type != "default" {
		return s
	}
	return rope.Scaling{Type: "yarn", Factor: 1, OriginalMaxPositionEmbeddings: maxPos}
}

// scalingJSON writes s as a transformers-4 rope_scaling object (nil for
// plain RoPE), with both "rope_type" and the legacy "type" that DeepSeek's
// own modeling code reads.
func scalingJSON(s rope.Scaling) any {
	if s.Type == "" || s.Type == "default" {
		return nil
	}
	o := map[string]any{"rope_type": s.Type, "type": s.Type, "factor": s.Factor}
	set := func(key string, v float64) {
		if v != 0 {
			o[key] = v
		}
	}
	switch s.Type {
	case "llama3":
		o["low_freq_factor"] = s.LowFreqFactor
		o["high_freq_factor"] = s.HighFreqFactor
		o["original_max_position_embeddings"] = s.OriginalMaxPositionEmbeddings
	case "yarn":
		o["original_max_position_embeddings"] = s.OriginalMaxPositionEmbeddings
		set("beta_fast", s.BetaFast)
		set("beta_slow", s.BetaSlow)
		set("attention_factor", s.AttentionFactor)
		set("mscale", s.MScale)
		set("mscale_all_dim", s.MScaleAllDim)
		if s.NoTruncate {
			o["truncate"] = false
		}
	}
	return o
}
