package mlafit

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/transmla/transmla/kernels"
)

// BenchmarkSequence times the forward and backward pass of one 512-token
// sequence through an MLA layer on one goroutine (Fit runs one sequence
// per core): llama-gqa-25m's shape at d_c 64 + d_r 64, and Llama-3-8B's at
// d_c 448 + d_r 64.
func BenchmarkSequence(b *testing.B) {
	for _, bc := range []struct {
		name                      string
		hidden, heads, latent, hd int
	}{
		{"llama-gqa-25m-dc64", 768, 6, 64, 128},
		{"llama3-8b-dc448", 4096, 32, 448, 128},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s := Shape{Hidden: bc.hidden, Heads: bc.heads, Nope: bc.hd, Rope: 64, Value: bc.hd, Latent: bc.latent, Eps: 1e-6, Interleave: true, AttnFactor: 1}
			s.Scale = 1 / math.Sqrt(float64(s.Nope+s.Rope))
			for j := range s.Rope / 2 {
				s.InvFreq = append(s.InvFreq, math.Pow(500000, -2*float64(j)/float64(bc.hd)))
			}
			const n = 512
			rng := rand.New(rand.NewPCG(1, 1))
			var p, g Params[float32]
			sz := s.sizes()
			for _, i := range []int{Q, KVA, KVANorm, KVB, O} {
				p[i] = make([]float32, sz[i])
				for j := range p[i] {
					p[i][j] = float32(rng.NormFloat64() * 0.03)
				}
				if i != O {
					g[i] = make([]float32, sz[i])
				}
			}
			x := make([]float32, n*s.Hidden)
			for j := range x {
				x[j] = float32(rng.NormFloat64())
			}
			l, err := NewLayer(s, n, Gemm[float32](kernels.Serial(kernels.NewNative()).Gemm))
			if err != nil {
				b.Fatal(err)
			}
			w := &Work[float32]{}
			b.ResetTimer()
			for range b.N {
				y := l.Forward(&p, x, n, w)
				l.Backward(&p, x, w, y, &g)
			}
		})
	}
}
