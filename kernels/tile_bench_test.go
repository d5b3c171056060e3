package kernels

import "testing"

// BenchmarkTile is each micro-kernel alone on data in L1: the ceiling that
// BenchmarkGemm's figures are to be read against.
func BenchmarkTile(b *testing.B) {
	for _, kern := range simdKernels() {
		b.Run(kern.name, func(b *testing.B) {
			kc := 256
			a := make([]float32, kc*kern.mr*8)
			bb := make([]float32, kc*kern.nr)
			c := make([]float32, kern.mr*kern.nr)
			for b.Loop() {
				for i := range 8 {
					kern.tile(kc, a[i*kc*kern.mr:], bb, c, kern.nr, 1, 0)
				}
			}
			b.ReportMetric(float64(8*2*kc*kern.mr*kern.nr)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}
