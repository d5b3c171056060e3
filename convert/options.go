// Package convert rewrites a GQA checkpoint as Multi-head Latent Attention
// in DeepSeek-V3's layout: RoPE moves into a small decoupled key (rope/),
// the position-free keys and the values share one low-rank latent (svd/),
// the query side absorbs the rest, and the result is written as a
// DeepSeek-V3 checkpoint, one layer at a time.
package convert

import (
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

// Output formats.
const (
	// FormatExact keeps every bias and has no kv_a_layernorm: the converted
	// function exactly, read by this project's eval.
	FormatExact = "exact"
	// FormatStock loads unchanged in transformers, vLLM and SGLang: a
	// kv_a_layernorm on the latent and no q/kv_a biases.
	FormatStock = "deepseek-v3-stock"
)

// DefaultFormat is convert's format: the one engines load.
const DefaultFormat = FormatStock

// Formats lists the output formats.
func Formats() []string { return []string{FormatExact, FormatStock} }

// Error weightings of the joint latent.
const (
	// WeightNone is plain PCA (calibrated) or SVD (data-free) of [K_nope; V].
	WeightNone = "none"
	// WeightBalanced scales the key rows so that a key dim carries as much
	// energy as a value dim on average (TransMLA's balanced KV).
	WeightBalanced = "bkv"
	// WeightAttention weights the key error by the queries that read it and
	// the value error by o_proj, what attention actually sees.
	WeightAttention = "attention"
)

// Weightings lists the error weightings.
func Weightings() []string { return []string{WeightNone, WeightBalanced, WeightAttention} }

// Options controls a conversion.
type Options struct {
	// Rank is d_c, the latent width (kv_lora_rank).
	Rank int
	// RopeDim is d_r, the decoupled RoPE key width (qk_rope_head_dim).
	RopeDim int
	// RopeMethod is one of rope.Methods().
	RopeMethod string
	// RopeStride places the RoPE slots at every RopeStride-th source
	// frequency from the fastest, or several per frequency for 1/2 and 1/4
	// (rope.Options.Stride); 0 spreads them over all, head_dim/rope_dim
	// apart. The export's rope_theta follows (rope.SlotTheta).
	RopeStride float64
	// FreqFold is RoRoPE's band of frequencies rotated together; 0 is the
	// smallest (the stride).
	FreqFold int
	// RopeRank is RoRoPE's ranking of components (rope.Rankings()); ""
	// ranks by score when calibrated and by key energy when data-free,
	// where the queries' moments are the weights' alone (measured: score
	// ranking is better with calibration, worse without).
	RopeRank string
	// NopeSpan, when positive, scales each position-free key component by
	// the mean of cos(ωΔ) over distances Δ in [0, NopeSpan]: the rotation
	// it lost, averaged.
	NopeSpan float64
	// Weighting is one of Weightings().
	Weighting string
	// ValueWeight tilts the attention weighting towards values (>1) or
	// keys (<1); the zero value means 1.
	ValueWeight float64
	// Format is one of Formats(); "" means DefaultFormat.
	Format string
	// Target is one of TargetNames(); "" means TargetAny. A target other
	// than any makes Validate refuse what that engine cannot compute and,
	// unless PadLatent is set, pads the latent to its smallest accepted
	// width (Target.PadTo).
	Target string
	// PadLatent, when positive, is the kv_lora_rank stored: the latent's
	// dims padded with zeros up to it (model.MLAConfig.LatentPad), which
	// engines cache and this project's eval does not.
	PadLatent int
	// ExactRoPE keeps RoPE on every key dim at its own frequency (the
	// exactness anchor); such a model is evaluated in memory only.
	ExactRoPE bool

	// ropeOnly skips the factorization: the latent is [K_nope; V] itself,
	// the RoPE stage alone, which tests compare the lossless rank with.
	ropeOnly bool
}

// DefaultNopeSpan is the --nope-span measured best on the shared Llama and
// Qwen2 models (8 beat 0, 4, 16, 32, 128 and 1024).
const DefaultNopeSpan = 8

// DefaultRopeDim is the --rope-dim default: 64, DeepSeek-V3's, or the
// largest even divisor of head_dim below it.
func DefaultRopeDim(headDim int) int {
	for r := min(64, headDim); r >= 2; r-- {
		if r%2 == 0 && headDim%r == 0 {
			return r
		}
	}
	return 0
}

// DefaultOptions are convert's defaults for a source with cfg at latent
// width rank: RoRoPE with FreqFold auto, the measured nope span, the
// attention-aware weighting, the default (stock) format.
func DefaultOptions(cfg model.Config, rank int) Options {
	dr := DefaultRopeDim(cfg.HeadDim)
	return Options{
		Rank: rank, RopeDim: dr, RopeMethod: rope.MethodRoRoPE, FreqFold: AutoFreqFold(cfg, dr, 0),
		NopeSpan: DefaultNopeSpan, Weighting: WeightAttention, ValueWeight: 1, Format: DefaultFormat,
	}
}

// AutoFreqFold is the FreqFold that --freqfold auto picks for RoPE slots
// of ropeDim at stride (0 = head_dim/ropeDim): two slots' worth of
// frequencies where that divides head_dim/2 and the band's fastest and
// slowest frequencies are within a factor 2 (measured best on the shared
// Llama and Qwen2), else one slot's: folding frequencies further apart
// rotates keys at the wrong speed (stories260K's neighbours differ 10×).
func AutoFreqFold(cfg model.Config, ropeDim int, stride float64) int {
	d := cfg.HeadDim
	if ropeDim <= 0 || (stride == 0 && d%ropeDim != 0) {
		return 0 // Validate reports the bad --rope-dim
	}
	unit := max(1, int(stride))
	if stride == 0 {
		unit = d / ropeDim
	}
	if fold := 2 * unit; (d/2)%fold == 0 && math.Pow(cfg.Rope.Theta, 2*float64(fold-1)/float64(d)) <= 2 {
		return fold
	}
	return unit
}

// rank resolves RopeRank for a calibrated or data-free conversion.
func (o Options) rank(calibrated bool) string {
	switch {
	case o.RopeRank != "":
		return o.RopeRank
	case calibrated:
		return rope.RankScore
	}
	return rope.RankKey
}

// format is the output format: Format, or the exact-RoPE anchor's exact,
// or DefaultFormat.
func (o Options) format() string {
	switch {
	case o.Format != "":
		return o.Format
	case o.ExactRoPE:
		return FormatExact
	}
	return DefaultFormat
}

func (o Options) valueWeight() float64 {
	if o.ValueWeight == 0 {
		return 1
	}
	return o.ValueWeight
}

// LosslessRank is the d_c above which the latent cannot lose anything:
// the 2·n_kv·d_h stacked K/V dims less the d_r that RoPE keeps.
func LosslessRank(cfg model.Config, ropeDim int) int {
	return 2*cfg.NumKVHeads*cfg.HeadDim - ropeDim
}

// Validate checks the options against the source model; its errors name
// the flag to fix.
func (o Options) Validate(cfg model.Config) error {
	if cfg.MLA != nil {
		return fmt.Errorf("the model is already MLA (%s); convert reads GQA models (%v)", cfg.Architecture, gqaArchitectures())
	}
	if cfg.Rope.Dim != cfg.HeadDim {
		return fmt.Errorf("the model rotates %d of %d head dims (partial_rotary_factor); only full-RoPE sources are supported", cfg.Rope.Dim, cfg.HeadDim)
	}
	// YaRN rounds its ramp in index units and scales cos/sin, so a
	// rope-dim RoPE would neither rotate at the source's frequencies nor
	// leave the position-free scores unscaled.
	if cfg.Rope.Scaling.Type == "yarn" {
		return fmt.Errorf("rope_scaling yarn is not supported by convert (default, linear and llama3 are)")
	}
	if o.ExactRoPE {
		if o.Format != "" && o.Format != FormatExact {
			return fmt.Errorf("the exact-RoPE anchor cannot be written as %s", o.Format)
		}
	} else {
		d := cfg.HeadDim
		switch {
		case o.RopeDim <= 0 || o.RopeDim%2 != 0:
			return fmt.Errorf("--rope-dim %d must be a positive even number", o.RopeDim)
		case o.RopeStride == 0 && o.RopeDim > d:
			return fmt.Errorf("--rope-dim %d exceeds head_dim %d: a wider RoPE key needs --rope-stride below 1 (two or more slots per frequency)", o.RopeDim, d)
		case o.RopeStride == 0 && d%o.RopeDim != 0:
			return fmt.Errorf("--rope-dim %d must divide head_dim %d (DeepSeek's RoPE frequencies must be a subset of the source's), or give --rope-stride", o.RopeDim, d)
		}
		if err := rope.CheckSlots(d, o.RopeDim, o.RopeStride); err != nil {
			return fmt.Errorf("--rope-dim %d with --rope-stride %v: %w", o.RopeDim, o.RopeStride, err)
		}
		if o.RopeRank != "" && !slices.Contains(rope.Rankings(), o.RopeRank) {
			return fmt.Errorf("--rope-rank %q is not one of auto, %s", o.RopeRank, strings.Join(rope.Rankings(), ", "))
		}
		if !slices.Contains(rope.Methods(), o.RopeMethod) {
			return fmt.Errorf("--rope-select %q is not one of %v", o.RopeMethod, rope.Methods())
		}
		if o.FreqFold != 0 {
			c := int(o.RopeStride)
			if o.RopeStride == 0 {
				c = d / o.RopeDim
			}
			c = max(c, 1)
			if o.RopeMethod != rope.MethodRoRoPE {
				return fmt.Errorf("--freqfold applies to --rope-select %s only", rope.MethodRoRoPE)
			}
			if o.FreqFold < 0 || o.FreqFold%c != 0 || (d/2)%o.FreqFold != 0 {
				return fmt.Errorf("--freqfold %d must be a multiple of the rope stride %d that divides head_dim/2 = %d", o.FreqFold, c, d/2)
			}
		}
		// What the RoPE stage itself will refuse, refused here, before any
		// work (FreqFold 0 stands for its default).
		ro := rope.Options{Method: o.RopeMethod, RopeDim: o.RopeDim, Stride: o.RopeStride, FreqFold: o.FreqFold}
		if err := ro.Check(d, cfg.NumKVHeads); err != nil {
			return fmt.Errorf("--rope-dim %d, --rope-stride %v, --freqfold %d (0: its default): %w", o.RopeDim, o.RopeStride, o.FreqFold, err)
		}
		if bound := LosslessRank(cfg, o.RopeDim); o.Rank > bound {
			return fmt.Errorf("--dc %d is above the lossless bound 2·n_kv·d_h − d_r = %d; use --dc %d or less", o.Rank, bound, bound)
		}
	}
	if o.Rank <= 0 {
		return fmt.Errorf("--dc %d must be positive", o.Rank)
	}
	if !slices.Contains(Weightings(), o.Weighting) {
		return fmt.Errorf("--weighting %q is not one of %v", o.Weighting, Weightings())
	}
	if o.ValueWeight < 0 || math.IsNaN(o.ValueWeight) || math.IsInf(o.ValueWeight, 0) {
		return fmt.Errorf("--value-weight %v must be positive and finite", o.ValueWeight)
	}
	if o.Format != "" && !slices.Contains(Formats(), o.Format) {
		return fmt.Errorf("--format %q is not one of %v", o.Format, Formats())
	}
	if o.NopeSpan < 0 || math.IsNaN(o.NopeSpan) || math.IsInf(o.NopeSpan, 0) {
		return fmt.Errorf("--nope-span %v must be zero or positive and finite", o.NopeSpan)
	}
	return o.validateTarget(cfg)
}

// validateTarget checks --pad-latent and --target against the converted
// model's config.
func (o Options) validateTarget(cfg model.Config) error {
	if o.ExactRoPE {
		if o.PadLatent != 0 || (o.Target != "" && o.Target != TargetAny) {
			return fmt.Errorf("the exact-RoPE anchor has no engine target or padding")
		}
		return nil
	}
	rank := min(o.Rank, LosslessRank(cfg, o.RopeDim))
	if o.PadLatent < 0 || (o.PadLatent > 0 && o.PadLatent < rank) {
		return fmt.Errorf("--pad-latent %d must be at least the latent width %d", o.PadLatent, rank)
	}
	if o.Target == "" || o.Target == TargetAny {
		return nil
	}
	t, ok := LookupTarget(o.Target)
	if !ok {
		return fmt.Errorf("--target %q is not one of %v", o.Target, TargetNames())
	}
	if _, ok := t.PadTo(rank, o.RopeDim); !ok && o.PadLatent == 0 {
		return fmt.Errorf("--target %s (%s) takes no latent with --rope-dim %d: %s", t.Name, t.Engine, o.RopeDim, t.shapes())
	}
	if err := t.Check(TargetConfig(cfg, o)); err != nil {
		return fmt.Errorf("--target %s (%s) cannot load this conversion: %w", t.Name, t.Engine, err)
	}
	return nil
}

// stockNormEps is rms_norm_eps in stock exports.
const stockNormEps = 1e-6

func gqaArchitectures() []string {
	return slices.DeleteFunc(model.Supported(), func(s string) bool { return s == "DeepseekV3ForCausalLM" })
}

// TargetConfig is the MLA config of the converted model.
func TargetConfig(src model.Config, o Options) model.Config {
	dst := src
	dst.Architecture = "DeepseekV3ForCausalLM"
	dr := o.RopeDim
	if o.ExactRoPE {
		dr = src.NumKVHeads * src.HeadDim
	}
	stock := o.format() == FormatStock
	if stock {
		// transformers builds kv_a_layernorm with its default epsilon 1e-6
		// whatever the config says, vLLM and SGLang with rms_norm_eps: the
		// latent shrink needs one value, and the other norms barely notice.
		dst.RMSNormEps = stockNormEps
		// vLLM's DeepseekV2ForCausalLM never ties lm_head to the
		// embeddings: a tied checkpoint, which has no lm_head.weight, gets
		// a zero head there (uniform logits, ppl = vocabulary size). The
		// stock export stores the head.
		dst.TieWordEmbeddings = false
	}
	rank := min(o.Rank, LosslessRank(src, dr))
	pad := o.PadLatent
	if t, ok := LookupTarget(o.Target); ok && pad == 0 && !o.ExactRoPE {
		pad, _ = t.PadTo(rank, dr)
	}
	dst.MLA = &model.MLAConfig{
		KVLoraRank:     rank,
		LatentPad:      max(0, pad-rank),
		QKRopeHeadDim:  dr,
		QKNopeHeadDim:  src.HeadDim,
		VHeadDim:       src.HeadDim,
		KVANorm:        stock,
		QBias:          src.QKVBias && !stock,
		KVABias:        src.QKVBias && !stock,
		RopeInterleave: true,
	}
	dst.NumKVHeads = src.NumHeads
	dst.HeadDim = src.HeadDim + dr
	dst.Rope.Dim = dr
	if !o.ExactRoPE {
		dst.Rope.Theta = rope.SlotTheta(src.Rope.Theta, src.HeadDim, dr, o.RopeStride)
	}
	dst.QKVBias = false
	return dst
}
