package eval

import (
	"context"
	"testing"

	"github.com/transmla/transmla/kernels"
)

func BenchmarkDecodeProf(b *testing.B) {
	m, _ := loadShared(b, "llama-gqa-25m")
	r, err := NewRunnerWith(m, kernels.NewNative(), Options{MaxPositions: 4096 + 4096, CacheDType: kernels.RowBF16})
	if err != nil {
		b.Fatal(err)
	}
	cache := r.NewCache()
	if _, err := r.Forward(context.Background(), cache, []int{1, 2, 3, 4}, false); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if cache.Len() > 4000 {
			cache.Truncate(4)
		}
		if _, err := r.Forward(context.Background(), cache, []int{5}, false); err != nil {
			b.Fatal(err)
		}
	}
}
