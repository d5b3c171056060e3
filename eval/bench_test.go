package eval

import (
	"context"
	"testing"

	"github.com/transmla/transmla/kernels"
)

// BenchmarkForwardWindow runs one 1024-token window of each shared model
// (the eval workload) and reports tokens/s.
func BenchmarkForwardWindow(b *testing.B) {
	for _, name := range []string{"llama-gqa-25m", "qwen2-gqa-16m"} {
		b.Run(name, func(b *testing.B) {
			m, _ := loadShared(b, name)
			be, err := kernels.Select("auto")
			if err != nil {
				b.Fatal(err)
			}
			r, err := NewRunner(m, be, 1024)
			if err != nil {
				b.Fatal(err)
			}
			ids := make([]int, 1024)
			for i := range ids {
				ids[i] = (i * 7919) % m.Config.VocabSize
			}
			cache := r.NewCache()
			for b.Loop() {
				cache.Reset()
				if _, err := r.Forward(context.Background(), cache, ids, true); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(1024*b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}
