// Package rope computes rotary position embedding (RoPE) frequencies and
// rotation tables in the Hugging Face conventions, including the
// context-extension schemes (linear, llama3, yarn) that checkpoints declare
// under rope_scaling.
package rope

import (
	"fmt"
	"math"
)

// Scaling describes a checkpoint's rope_scaling entry. The zero value (Type
// "" or "default") means plain RoPE.
type Scaling struct {
	// Type is "default", "linear", "llama3" or "yarn".
	Type string
	// Factor is the context-extension factor (linear, llama3, yarn).
	Factor float64
	// LowFreqFactor and HighFreqFactor bound llama3's smoothing band.
	LowFreqFactor, HighFreqFactor float64
	// OriginalMaxPositionEmbeddings is the pre-extension context (llama3, yarn).
	OriginalMaxPositionEmbeddings int
	// BetaFast and BetaSlow bound yarn's ramp, in rotations (defaults 32 and 1).
	BetaFast, BetaSlow float64
	// AttentionFactor scales cos/sin (yarn); 0 means derive it from Factor.
	AttentionFactor float64
	// MScale and MScaleAllDim are DeepSeek's variant of the yarn attention factor.
	MScale, MScaleAllDim float64
	// NoTruncate disables yarn's rounding of the correction range (HF "truncate": false).
	NoTruncate bool
}

// Types lists the supported rope_scaling types.
var Types = []string{"default", "linear", "llama3", "yarn"}

// Params fully determines a RoPE: the rotated dimension, the base and the scaling.
type Params struct {
	// Dim is the number of rotated dimensions (the head dimension for Llama-like models); even.
	Dim int
	// Theta is the frequency base (rope_theta).
	Theta float64
	// Scaling is the rope_scaling entry.
	Scaling Scaling
}

// InvFreq returns the Dim/2 inverse frequencies ω_j of the rotation pairs
// (j, j+Dim/2) and the factor by which cos and sin are multiplied (1 except for yarn).
func (p Params) InvFreq() (invFreq []float64, attentionFactor float64, err error) {
	if p.Dim <= 0 || p.Dim%2 != 0 {
		return nil, 0, fmt.Errorf("rope: dimension %d must be positive and even", p.Dim)
	}
	if !(p.Theta > 1) {
		return nil, 0, fmt.Errorf("rope: rope_theta %v must be > 1", p.Theta)
	}
	half := p.Dim / 2
	base := make([]float64, half)
	for j := range base {
		base[j] = 1 / math.Pow(p.Theta, float64(2*j)/float64(p.Dim))
	}
	s := p.Scaling
	switch s.Type {
	case "", "default":
		return base, 1, nil
	case "linear":
		if !(s.Factor > 0) {
			return nil, 0, fmt.Errorf("rope: linear scaling needs factor > 0, got %v", s.Factor)
		}
		for j := range base {
			base[j] /= s.Factor
		}
		return base, 1, nil
	case "llama3":
		return llama3(base, s)
	case "yarn":
		return yarn(base, p, s)
	default:
		return nil, 0, fmt.Errorf("rope: unsupported rope_scaling type %q (supported: %v)", s.Type, Types)
	}
}

// llama3 divides low frequencies by the factor, keeps high ones and blends
// the band between, as Llama 3.1 does.
func llama3(invFreq []float64, s Scaling) ([]float64, float64, error) {
	if !(s.Factor > 0) || !(s.LowFreqFactor > 0) || !(s.HighFreqFactor > s.LowFreqFactor) || s.OriginalMaxPositionEmbeddings <= 0 {
		return nil, 0, fmt.Errorf("rope: llama3 scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0, got %+v", s)
	}
	oldCtx := float64(s.OriginalMaxPositionEmbeddings)
	lowWavelen := oldCtx / s.LowFreqFactor
	highWavelen := oldCtx / s.HighFreqFactor
	out := make([]float64, len(invFreq))
	for j, f := range invFreq {
		wavelen := 2 * math.Pi / f
		switch {
		case wavelen < highWavelen:
			out[j] = f
		case wavelen > lowWavelen:
			out[j] = f / s.Factor
		default:
			smooth := (oldCtx/wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor)
			out[j] = (1-smooth)*f/s.Factor + smooth*f
		}
	}
	return out, 1, nil
}

// yarn interpolates low frequencies, extrapolates high ones with a linear
// ramp between, and scales the attention logits through cos/sin.
func yarn(invFreq []float64, p Params, s Scaling) ([]float64, float64, error) {
	if !(s.Factor > 0) || s.OriginalMaxPositionEmbeddings <= 0 {
		return nil, 0, fmt.Errorf("rope: yarn scaling needs factor > 0 and original_max_position_embeddings > 0, got %+v", s)
	}
	mscale := func(scale, m float64) float64 {
		if scale <= 1 {
			return 1
		}
		return 0.1*m*math.Log(scale) + 1
	}
	attn := s.AttentionFactor
	if attn == 0 {
		if s.MScale != 0 && s.MScaleAllDim != 0 {
			attn = mscale(s.Factor, s.MScale) / mscale(s.Factor, s.MScaleAllDim)
		} else {
			attn = mscale(s.Factor, 1)
		}
	}
	betaFast, betaSlow := s.BetaFast, s.BetaSlow
	if betaFast == 0 {
		betaFast = 32
	}
	if betaSlow == 0 {
		betaSlow = 1
	}
	dim := float64(p.Dim)
	correctionDim := func(rotations float64) float64 {
		return dim * math.Log(float64(s.OriginalMaxPositionEmbeddings)/(rotations*2*math.Pi)) / (2 * math.Log(p.Theta))
	}
	low, high := correctionDim(betaFast), correctionDim(betaSlow)
	if !s.NoTruncate {
		low, high = math.Floor(low), math.Ceil(high)
	}
	low, high = math.Max(low, 0), math.Min(high, dim-1)
	if low == high {
		high += 0.001 // avoid a zero-width ramp
	}
	out := make([]float64, len(invFreq))
	for j, f := range invFreq {
		ramp := math.Min(math.Max((float64(j)-low)/(high-low), 0), 1)
		extrapolation := 1 - ramp
		out[j] = f/s.Factor*(1-extrapolation) + f*extrapolation
	}
	return out, attn, nil
}

// Table holds cos and sin of every (position, pair) up to a maximum length,
// already multiplied by the attention factor.
type Table struct {
	half     int
	cos, sin []float32
}

// NewTable precomputes the rotation of p for positions [0, maxPos).
func NewTable(p Params, maxPos int) (*Table, error) {
	inv, attn, err := p.InvFreq()
	if err != nil {
		return nil, err
	}
	return NewTableFromInvFreq(inv, attn, maxPos)
}

// NewTableFromInvFreq precomputes the rotation for positions [0, maxPos)
// from explicit inverse frequencies ω_j (one per rotated pair), with cos and
// sin multiplied by attentionFactor. Converted models whose RoPE pairs carry
// frequencies of no standard scheme use it.
func NewTableFromInvFreq(invFreq []float64, attentionFactor float64, maxPos int) (*Table, error) {
	if maxPos < 0 {
		return nil, fmt.Errorf("rope: negative table length %d", maxPos)
	}
	if len(invFreq) == 0 {
		return nil, fmt.Errorf("rope: no inverse frequencies")
	}
	for j, f := range invFreq {
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return nil, fmt.Errorf("rope: inverse frequency %d is %v", j, f)
		}
	}
	if math.IsNaN(attentionFactor) || math.IsInf(attentionFactor, 0) {
		return nil, fmt.Errorf("rope: attention factor is %v", attentionFactor)
	}
	half := len(invFreq)
	t := &Table{half: half, cos: make([]float32, maxPos*half), sin: make([]float32, maxPos*half)}
	for pos := 0; pos < maxPos; pos++ {
		for j, f := range invFreq {
			s, c := math.Sincos(float64(pos) * f)
			t.cos[pos*half+j] = float32(c * attentionFactor)
			t.sin[pos*half+j] = float32(s * attentionFactor)
		}
	}
	return t, nil
}

// Len is the number of positions the table covers.
func (t *Table) Len() int { return len(t.cos) / max(t.half, 1) }

// Rotate applies RoPE in the rotate-half layout to one head vector x of
// length 2·half at position pos: (x_j, x_{j+half}) is rotated by angle pos·ω_j.
func (t *Table) Rotate(x []float32, pos int) {
	h := t.half
	c := t.cos[pos*h : pos*h+h]
	s := t.sin[pos*h : pos*h+h]
	lo, hi := x[:h], x[h:2*h]
	for j := range h {
		a, b := lo[j], hi[j]
		lo[j] = a*c[j] - b*s[j]
		hi[j] = b*c[j] + a*s[j]
	}
}

// RotateInterleaved applies RoPE in the interleaved layout (DeepSeek's
// rope_interleave) to one vector x of length 2·half at position pos: the
// pair (x_2j, x_2j+1) is rotated by angle pos·ω_j. Transformers instead
// de-interleaves x and applies rotate-half; that is the same rotation
// followed by a permutation applied to queries and keys alike, so scores
// agree.
func (t *Table) RotateInterleaved(x []float32, pos int) {
	h := t.half
	c := t.cos[pos*h : pos*h+h]
	s := t.sin[pos*h : pos*h+h]
	x = x[:2*h]
	for j := range h {
		a, b := x[2*j], x[2*j+1]
		x[2*j] = a*c[j] - b*s[j]
		x[2*j+1] = b*c[j] + a*s[j]
	}
}
