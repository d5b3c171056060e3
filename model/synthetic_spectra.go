package model

import (
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"runtime"
	"sync"

	"github.com/transmla/transmla/internal/f64"
	"github.com/transmla/transmla/safetensors"
)

// SyntheticLlama8B is the synthetic spec of Llama-3-8B's shape (hidden 4096, 32
// query heads and 8 KV heads of 128, MLP 14336, vocabulary 128256, RoPE
// base 500000) with the given number of layers, bf16, with trained-model
// spectra (Spectra).
func SyntheticLlama8B(layers int) SyntheticSpec {
	return SyntheticSpec{
		Layers: layers, Hidden: 4096, Heads: 32, KVHeads: 8, HeadDim: 128, Intermediate: 14336,
		Vocab: 128256, RopeTheta: 500000, MaxPositions: 8192, DType: safetensors.BF16, Seed: 1, Spectra: true,
	}
}

// Spectral profiles of the attention projections: head block h of a
// projection is U_h·diag(σ)·G_h with U_h a random rotation, G_h random
// input directions, and σ_i = (1+i/tau)^-alpha, normalised to a mean
// square of 1. Keys decay fastest and values slowest, the order seen in
// trained Llama models (their keys are markedly low-rank); the exponents
// are this generator's choice. A share sharedInput of each block's input
// energy lies in directions common to the whole layer, so that the heads
// of K and V overlap and a joint latent compresses them, as it does
// trained ones.
type spectrum struct{ tau, alpha float64 }

var (
	querySpectrum  = spectrum{tau: 8, alpha: 0.7}
	keySpectrum    = spectrum{tau: 4, alpha: 1.0}
	valueSpectrum  = spectrum{tau: 32, alpha: 0.5}
	outputSpectrum = spectrum{tau: 32, alpha: 0.5}
)

const (
	// sharedDirs is the number of input directions all heads of a layer
	// read in part, and sharedInput the fraction of each head's input
	// energy they carry.
	sharedDirs  = 256
	sharedInput = 0.5
	// genRows is the number of rows generated from one random stream, so
	// that large tensors are generated in parallel and still reproducibly.
	genRows = 256
)

func (s spectrum) values(n int) []float64 {
	v := make([]float64, n)
	var ms float64
	for i := range v {
		v[i] = math.Pow(1+float64(i)/s.tau, -s.alpha)
		ms += v[i] * v[i] / float64(n)
	}
	for i := range v {
		v[i] /= math.Sqrt(ms)
	}
	return v
}

// spectraGen draws the tensors of a Spectra checkpoint, each from random
// streams of its own, so that they can be drawn lazily, in parallel, in
// any order.
type spectraGen struct {
	spec SyntheticSpec
}

func (g spectraGen) rng(tensor, stream uint64) *rand.Rand {
	return rand.New(rand.NewPCG(g.spec.Seed, tensor<<32|stream))
}

// parallelRows runs f on blocks of genRows rows of n, on every core.
func parallelRows(n int, f func(block, lo, hi int)) {
	blocks := (n + genRows - 1) / genRows
	var wg sync.WaitGroup
	next := make(chan int, blocks)
	for b := range blocks {
		next <- b
	}
	close(next)
	for range min(blocks, runtime.GOMAXPROCS(0)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range next {
				f(b, b*genRows, min(n, (b+1)*genRows))
			}
		}()
	}
	wg.Wait()
}

// gaussian is an out×in matrix of N(0, std²) entries with the row decay
// of WriteSynthetic's default weights (MLP, embeddings, lm_head).
func (g spectraGen) gaussian(tensor uint64, out, in int, std float64, decay bool) []float32 {
	w := make([]float32, out*in)
	parallelRows(out, func(b, lo, hi int) {
		rng := g.rng(tensor, uint64(b))
		for r := lo; r < hi; r++ {
			s := std
			if decay {
				s /= math.Sqrt(1 + float64(rng.IntN(out))/8)
			}
			row := w[r*in : (r+1)*in]
			for c := range row {
				row[c] = float32(rng.NormFloat64() * s)
			}
		}
	})
	return w
}

// directions are sharedDirs Gaussian rows of length in, from stream.
func (g spectraGen) directions(stream uint64, in int) []float64 {
	rng := g.rng(stream, 1<<31)
	dirs := make([]float64, sharedDirs*in)
	for j := range dirs {
		dirs[j] = rng.NormFloat64()
	}
	return dirs
}

// randomRotation is a d×d orthogonal matrix: Gram–Schmidt of a Gaussian.
func randomRotation(rng *rand.Rand, d int) []float64 {
	u := make([]float64, d*d)
	for i := range u {
		u[i] = rng.NormFloat64()
	}
	for i := range d {
		row := u[i*d : (i+1)*d]
		for j := range i {
			prev := u[j*d : (j+1)*d]
			var dot float64
			for k, v := range row {
				dot += v * prev[k]
			}
			for k := range row {
				row[k] -= dot * prev[k]
			}
		}
		var norm float64
		for _, v := range row {
			norm += v * v
		}
		norm = math.Sqrt(norm)
		for k := range row {
			row[k] /= norm
		}
	}
	return u
}

// heads returns blocks×d rows of in columns: block h is U_h·diag(σ)·G_h
// scaled to rows of mean square 1/in, with G_h part private Gaussian
// directions and part the layer's shared ones. rowScale, when not nil,
// multiplies row i of every block.
func (g spectraGen) heads(tensor uint64, shared []float64, blocks, d, in int, s spectrum, rowScale []float64) []float64 {
	sigma := s.values(d)
	w := make([]float64, blocks*d*in)
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for h := range blocks {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			rng := g.rng(tensor, uint64(h))
			// G_h = √(1−ρ)·private + √ρ·R_h·shared, rows of unit mean square.
			gh := make([]float64, d*in)
			for i := range gh {
				gh[i] = math.Sqrt(1-sharedInput) * rng.NormFloat64()
			}
			mix := make([]float64, d*sharedDirs)
			for i := range mix {
				mix[i] = rng.NormFloat64() * math.Sqrt(sharedInput/sharedDirs)
			}
			f64.Gemm(false, false, d, in, sharedDirs, 1, mix, sharedDirs, shared, in, 1, gh, in)
			u := randomRotation(rng, d)
			for i := range d {
				for j := range d {
					u[i*d+j] *= sigma[j] / math.Sqrt(float64(in))
				}
			}
			blk := w[h*d*in : (h+1)*d*in]
			f64.Gemm(false, false, d, in, d, 1, u, d, gh, in, 0, blk, in)
			if rowScale != nil {
				for i, f := range rowScale {
					for k := range in {
						blk[i*in+k] *= f
					}
				}
			}
		}()
	}
	wg.Wait()
	return w
}

// ropeProfile scales the rows of a key head: RoPE pairs of low frequency
// (high index) carry more energy, as in trained models' keys.
func ropeProfile(d int) []float64 {
	f := make([]float64, d)
	for i := range f {
		j := float64(i%(d/2)) / float64(d/2)
		f[i] = 0.5 + 1.5*j*j
	}
	return f
}

func toFloat32(w []float64) []float32 {
	out := make([]float32, len(w))
	for i, v := range w {
		out[i] = float32(v)
	}
	return out
}

func transpose(w []float64, rows, cols int) []float64 {
	t := make([]float64, len(w))
	for i := range rows {
		for j := range cols {
			t[j*rows+i] = w[i*cols+j]
		}
	}
	return t
}

// writeSpectra writes spec's tensors for WriteSynthetic when spec.Spectra:
// each is drawn when the writer reaches it, so memory holds one at a time.
func writeSpectra(ctx context.Context, dir string, spec SyntheticSpec) error {
	g := spectraGen{spec: spec}
	var specs []safetensors.TensorSpec
	// Tensor numbers name the random streams; they never change meaning.
	var tensor uint64
	add := func(name string, shape []int, draw func(tensor uint64) []float32) {
		tensor++
		t := tensor
		specs = append(specs, safetensors.TensorSpec{Name: name, DType: spec.DType, Shape: shape, Write: func(w io.Writer) error {
			if err := ctx.Err(); err != nil {
				return err
			}
			return safetensors.Float32Tensor(name, spec.DType, shape, draw(t)).Write(w)
		}})
	}
	D, d := spec.Hidden, spec.HeadDim
	q, kv, I := spec.Heads*d, spec.KVHeads*d, spec.Intermediate
	norm := func(n int) func(uint64) []float32 {
		return func(t uint64) []float32 {
			rng := g.rng(t, 0)
			w := make([]float32, n)
			for i := range w {
				w[i] = float32(1 + 0.1*rng.NormFloat64())
			}
			return w
		}
	}
	std := 1 / math.Sqrt(float64(D))
	add("model.embed_tokens.weight", []int{spec.Vocab, D}, func(t uint64) []float32 { return g.gaussian(t, spec.Vocab, D, 1, false) })
	for i := range spec.Layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		// The layer's shared input directions, the same for its q, k, v.
		sharedDirsOf := func() []float64 { return g.directions(uint64(1)<<31|uint64(i), D) }
		add(p+"input_layernorm.weight", []int{D}, norm(D))
		add(p+"self_attn.q_proj.weight", []int{q, D}, func(t uint64) []float32 {
			return toFloat32(g.heads(t, sharedDirsOf(), spec.Heads, d, D, querySpectrum, ropeProfile(d)))
		})
		add(p+"self_attn.k_proj.weight", []int{kv, D}, func(t uint64) []float32 {
			return toFloat32(g.heads(t, sharedDirsOf(), spec.KVHeads, d, D, keySpectrum, ropeProfile(d)))
		})
		add(p+"self_attn.v_proj.weight", []int{kv, D}, func(t uint64) []float32 {
			return toFloat32(g.heads(t, sharedDirsOf(), spec.KVHeads, d, D, valueSpectrum, nil))
		})
		if spec.QKVBias {
			for _, b := range []struct {
				name string
				n    int
			}{{"q", q}, {"k", kv}, {"v", kv}} {
				add(p+"self_attn."+b.name+"_proj.bias", []int{b.n}, func(t uint64) []float32 { return g.gaussian(t, 1, b.n, 0.1, false) })
			}
		}
		// o_proj reads each head's output through the transpose of such a
		// block: D×(H·d).
		add(p+"self_attn.o_proj.weight", []int{D, q}, func(t uint64) []float32 {
			dirs := g.directions(t<<1|1, D)
			return toFloat32(transpose(g.heads(t, dirs, spec.Heads, d, D, outputSpectrum, nil), q, D))
		})
		add(p+"post_attention_layernorm.weight", []int{D}, norm(D))
		add(p+"mlp.gate_proj.weight", []int{I, D}, func(t uint64) []float32 { return g.gaussian(t, I, D, std, true) })
		add(p+"mlp.up_proj.weight", []int{I, D}, func(t uint64) []float32 { return g.gaussian(t, I, D, std, true) })
		add(p+"mlp.down_proj.weight", []int{D, I}, func(t uint64) []float32 {
			return g.gaussian(t, D, I, 1/math.Sqrt(float64(I)), true)
		})
	}
	add("model.norm.weight", []int{D}, norm(D))
	add("lm_head.weight", []int{spec.Vocab, D}, func(t uint64) []float32 { return g.gaussian(t, spec.Vocab, D, std, true) })
	return safetensors.WriteCheckpoint(ctx, dir, specs, safetensors.WriteOptions{
		Metadata:      map[string]string{"format": "pt", "generator": "transmla synthetic"},
		MaxShardBytes: 5 << 30,
	})
}
