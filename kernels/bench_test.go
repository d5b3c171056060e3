package kernels

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// benchShapes are the Linear products x[m×k]·Wᵀ (W n×k) of the shared
// models at a 1024-token window, and of an 8B layer at prefill and decode.
var benchShapes = []struct{ m, n, k int }{
	{1024, 768, 768}, {1024, 256, 768}, {1024, 2048, 768}, {1024, 768, 2048},
	{1024, 512, 512}, {1024, 1376, 512}, {1024, 4096, 768},
	{1, 4096, 4096}, {1, 14336, 4096}, {1, 4096, 14336},
	{1024, 4096, 4096}, {1024, 14336, 4096}, {1024, 4096, 14336},
}

// benchBackends are the backends this binary and machine have, by name.
func benchBackends(b *testing.B) []Backend {
	var bes []Backend
	for _, name := range []string{"go", "openblas"} {
		be, err := Select(name)
		if err != nil {
			b.Logf("%s: %v", name, err)
			continue
		}
		bes = append(bes, be)
	}
	return bes
}

// BenchmarkGemm times C = X·Wᵀ for each shape and backend; the backends
// are sub-benchmarks of one shape so that their ratio comes from one run.
func BenchmarkGemm(b *testing.B) {
	bes := benchBackends(b)
	rng := rand.New(rand.NewPCG(1, 1))
	for _, s := range benchShapes {
		var x, w, c []float32 // made on first use: -bench may skip the shape
		for _, be := range bes {
			b.Run(fmt.Sprintf("m%d_n%d_k%d/%s", s.m, s.n, s.k, be.Name()), func(b *testing.B) {
				if x == nil {
					x, w = randSlice(rng, s.m*s.k), randSlice(rng, s.n*s.k)
					c = make([]float32, s.m*s.n)
				}
				b.SetBytes(int64(4 * (len(x) + len(w) + len(c))))
				for b.Loop() {
					be.Gemm(false, true, s.m, s.n, s.k, 1, x, s.k, w, s.k, 0, c, s.n)
				}
				b.ReportMetric(2*float64(s.m)*float64(s.n)*float64(s.k)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
			})
		}
	}
}
