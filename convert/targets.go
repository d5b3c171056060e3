package convert

import (
	"fmt"
	"slices"
	"strings"

	"github.com/transmla/transmla/model"
)

// Target is an inference engine, with one attention backend, that loads
// DeepSeek-V3 checkpoints, and what it accepts of them. The table is
// Targets(); README ("Engines that load the export") gives the source of
// every constraint and the runs that verified them.
type Target struct {
	// Name is the --target name.
	Name string `json:"name"`
	// Engine names the engine, its version and the backend.
	Engine string `json:"engine"`
	// CacheWidths lists the accepted kv_lora_rank + qk_rope_head_dim of
	// MLA backends; nil accepts any.
	CacheWidths []int `json:"cache_widths,omitempty"`
	// RopeDims lists the accepted qk_rope_head_dim; nil accepts any.
	RopeDims []int `json:"rope_dims,omitempty"`
	// HeadDims lists the accepted qk_nope_head_dim + qk_rope_head_dim of
	// backends that decompress the latent into per-head keys; nil: any.
	HeadDims []int `json:"head_dims,omitempty"`
	// RopeScalings lists the rope_scaling types the engine computes as
	// the source does on a DeepSeek-V3 model ("" is none).
	RopeScalings []string `json:"rope_scalings"`
	// Decompressed says the engine caches per-head keys and values
	// (2·heads·(qk_nope+qk_rope) values per token and layer) instead of
	// the latent row.
	Decompressed bool `json:"decompressed,omitempty"`
	// Verified is "run" when this project loaded exports in the engine
	// (README figures), "code" when the constraint is read from its code.
	Verified string `json:"verified"`
}

// TargetAny is the --target default: no engine constraint, no padding.
const TargetAny = "any"

// Targets lists the engines and backends that convert knows, in the
// order convert reports them.
func Targets() []Target {
	return []Target{
		{
			// modeling_deepseek_v3.py: any width; inv_freq from
			// ROPE_INIT_FUNCTIONS at head_dim = qk_rope_head_dim; the cache
			// holds the normed latent and the RoPE key.
			Name: "transformers", Engine: "transformers 5.19 DeepseekV3ForCausalLM",
			RopeScalings: []string{"", "linear", "llama3"}, Verified: "run",
		},
		// vLLM's DeepSeek model computes plain RoPE right only because the
		// export declares it as an identity YaRN (model.DeepSeekV3Config):
		// with rope_type default its CPU rotary kernel rotates the wrong
		// rows (README, "Measured in the engines").
		{
			// v1/attention/backends/mla/cpu_mla.py: head size 576 only, the
			// decode kernel's value width is kv_lora_rank = 512.
			Name: "vllm-cpu", Engine: "vLLM 0.32 CPU, CPU_MLA backend",
			CacheWidths: []int{576}, RopeDims: []int{64},
			RopeScalings: []string{""}, Verified: "run",
		},
		{
			// VLLM_MLA_DISABLE=1: DeepseekV2Attention decompresses into
			// ordinary attention; cpu_attn.py's head sizes.
			Name: "vllm-cpu-mha", Engine: "vLLM 0.32 CPU, VLLM_MLA_DISABLE=1 (CPU_ATTN backend)",
			HeadDims:     []int{32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512},
			RopeScalings: []string{""}, Decompressed: true, Verified: "run",
		},
		{
			// mla_attention.py MLACommonBackend: head sizes 320, 512, 576;
			// the Triton MLA backend adds no limit of its own.
			Name: "vllm", Engine: "vLLM 0.32 GPU, Triton MLA backend",
			CacheWidths:  []int{320, 512, 576},
			RopeScalings: []string{""}, Verified: "code",
		},
		{
			// flashmla.py / cutlass_mla.py (D_latent 512, D_rope 64) /
			// flashattn_mla.py (576): DeepSeek-V3's own shape.
			Name: "flashmla", Engine: "vLLM 0.32 GPU, FlashMLA, CUTLASS MLA and FlashAttention MLA backends",
			CacheWidths: []int{576}, RopeDims: []int{64},
			RopeScalings: []string{""}, Verified: "code",
		},
	}
}

// TargetNames lists the --target names: any, then Targets().
func TargetNames() []string {
	names := []string{TargetAny}
	for _, t := range Targets() {
		names = append(names, t.Name)
	}
	return names
}

// LookupTarget returns the target named name (not "any").
func LookupTarget(name string) (Target, bool) {
	for _, t := range Targets() {
		if t.Name == name {
			return t, true
		}
	}
	return Target{}, false
}

// Accepts reports whether t takes a latent of dc dims with a RoPE key of
// dr dims; the head-size limit of decompressing targets is Check's.
func (t Target) Accepts(dc, dr int) bool {
	if t.RopeDims != nil && !slices.Contains(t.RopeDims, dr) {
		return false
	}
	return t.CacheWidths == nil || slices.Contains(t.CacheWidths, dc+dr)
}

// PadTo is the smallest latent width of at least dc that t accepts with a
// RoPE key of dr dims: dc itself, or the width that zero padding must
// reach. ok is false when no width is accepted with this dr.
func (t Target) PadTo(dc, dr int) (padded int, ok bool) {
	if t.Accepts(dc, dr) {
		return dc, true
	}
	best := 0
	for _, w := range t.CacheWidths {
		if n := w - dr; n >= dc && t.Accepts(n, dr) && (best == 0 || n < best) {
			best = n
		}
	}
	return best, best > 0
}

// Check says why t cannot load the DeepSeek-V3 model of cfg as its source
// computes it, or nil: the stock layout (kv_a_layernorm, no biases), the
// stored latent and RoPE widths, the head size of decompressing backends,
// and the RoPE scaling.
func (t Target) Check(cfg model.Config) error {
	m := cfg.MLA
	if m == nil {
		return fmt.Errorf("not an MLA model")
	}
	if !m.KVANorm || m.QBias || m.KVABias || cfg.OBias {
		return fmt.Errorf("the exact format (no kv_a_layernorm, biases) is read by transmla only; use --format %s", FormatStock)
	}
	stored, dr := m.KVLoraRank+m.LatentPad, m.QKRopeHeadDim
	if !t.Accepts(stored, dr) {
		return fmt.Errorf("kv_lora_rank %d + qk_rope_head_dim %d: %s", stored, dr, t.shapes())
	}
	if hd := m.QKNopeHeadDim + dr; t.HeadDims != nil && !slices.Contains(t.HeadDims, hd) {
		return fmt.Errorf("qk_nope_head_dim + qk_rope_head_dim = %d is not one of the head sizes %v", hd, t.HeadDims)
	}
	if s := cfg.Rope.Scaling.Type; !slices.Contains(t.RopeScalings, strings.TrimPrefix(s, "default")) {
		if t.Name == "transformers" {
			return fmt.Errorf("rope_scaling %s is not computed like the source's on a %d-dim RoPE", s, dr)
		}
		// deepseek_v2.py rewrites every rope_type but default into
		// deepseek_yarn (or deepseek_llama_scaling, the same YaRN
		// frequencies), whose ramp is not the source's.
		return fmt.Errorf("its DeepSeek path replaces rope_scaling %s with DeepSeek's YaRN, which rotates at other frequencies", s)
	}
	return nil
}

// shapes describes t's accepted latent shapes.
func (t Target) shapes() string {
	var parts []string
	if t.CacheWidths != nil {
		parts = append(parts, fmt.Sprintf("kv_lora_rank + qk_rope_head_dim must be one of %v", t.CacheWidths))
	}
	if t.RopeDims != nil {
		parts = append(parts, fmt.Sprintf("qk_rope_head_dim one of %v", t.RopeDims))
	}
	if t.HeadDims != nil {
		parts = append(parts, fmt.Sprintf("qk_nope_head_dim + qk_rope_head_dim one of %v", t.HeadDims))
	}
	return strings.Join(parts, ", ")
}

// CacheValuesPerToken is the KV cache per token over all layers that t
// keeps for the model of cfg: the stored latent row, padding included,
// or the decompressed per-head keys and values.
func (t Target) CacheValuesPerToken(cfg model.Config) int {
	m := cfg.MLA
	if t.Decompressed {
		return 2 * cfg.NumHeads * (m.QKNopeHeadDim + m.QKRopeHeadDim) * cfg.NumLayers
	}
	return (m.KVLoraRank + m.LatentPad + m.QKRopeHeadDim) * cfg.NumLayers
}

// TargetStatus is whether one target loads a converted model.
type TargetStatus struct {
	Target
	// Loads is true when the target computes the converted model.
	Loads bool `json:"loads"`
	// Reason says why not.
	Reason string `json:"reason,omitempty"`
	// CacheValuesPerToken is the target's KV cache per token over all
	// layers (Target.CacheValuesPerToken).
	CacheValuesPerToken int `json:"cache_values_per_token"`
}

// Compatibility checks cfg, a converted model's config, against every
// target.
func Compatibility(cfg model.Config) []TargetStatus {
	var out []TargetStatus
	for _, t := range Targets() {
		st := TargetStatus{Target: t, Loads: true, CacheValuesPerToken: t.CacheValuesPerToken(cfg)}
		if err := t.Check(cfg); err != nil {
			st.Loads, st.Reason = false, err.Error()
		}
		out = append(out, st)
	}
	return out
}
