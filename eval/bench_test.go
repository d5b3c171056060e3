package eval

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/transmla/transmla/internal/sharedtest"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
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

// BenchmarkMLAPaths times one MLA layer of llama-gqa-25m's converted shape
// (6 heads, d_nope 128, d_r 64, d_v 128, hidden 768) by both attention
// paths and with bf16 and f32 caches, for prefills, a chunk after a long
// context and decoding: the measurements behind PathAuto's choice.
func BenchmarkMLAPaths(b *testing.B) {
	shapes := []struct {
		name    string
		n, past int
	}{
		{"prefill1024", 1024, 0},
		{"chunk256after3840", 256, 3840},
		{"decode_after4095", 1, 4095},
	}
	for _, dc := range []int{64, 192, 448} {
		cfg := model.Config{
			Architecture: "DeepseekV3ForCausalLM", HiddenSize: 768, IntermediateSize: 896, NumLayers: 1,
			NumHeads: 6, NumKVHeads: 6, HeadDim: 192, VocabSize: 256, MaxPositionEmbeddings: 4096, RMSNormEps: 1e-5,
			Rope: rope.Params{Dim: 64, Theta: 500000}, HiddenAct: "silu", BOSTokenID: -1,
			MLA: &model.MLAConfig{KVLoraRank: dc, QKRopeHeadDim: 64, QKNopeHeadDim: 128, VHeadDim: 128, RopeInterleave: true},
		}
		m := randomModel(b, cfg, 1)
		for _, sh := range shapes {
			for _, cp := range []struct {
				path MLAPath
				dt   kernels.RowDType
			}{{PathAbsorbed, kernels.RowBF16}, {PathDecompressed, kernels.RowBF16}, {PathAbsorbed, kernels.RowF32}, {PathDecompressed, kernels.RowF32}} {
				path := cp.path
				b.Run(fmt.Sprintf("dc%d/%s/%s/%s", dc, sh.name, cp.dt, path), func(b *testing.B) {
					r, err := NewRunnerWith(m, kernels.NewNative(), Options{MaxPositions: 4096, CacheDType: cp.dt, MLAPath: path})
					if err != nil {
						b.Fatal(err)
					}
					ids := make([]int, sh.past+sh.n)
					for i := range ids {
						ids[i] = (i * 7919) % cfg.VocabSize
					}
					cache := r.NewCache()
					if sh.past > 0 {
						if _, err := r.Forward(context.Background(), cache, ids[:sh.past], false); err != nil {
							b.Fatal(err)
						}
					}
					for b.Loop() {
						cache.Truncate(sh.past)
						if _, err := r.Forward(context.Background(), cache, ids[sh.past:], false); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
		}
	}
}

// BenchmarkDecodeStep decodes one token after 0, 1024 and 4096 cached
// positions of each shared model, weights resident as stored (bf16) and a
// bf16 cache, as `transmla bench` does; -cpuprofile on it shows where a
// decode step's time goes.
func BenchmarkDecodeStep(b *testing.B) {
	for _, name := range []string{"llama-gqa-25m", "qwen2-gqa-16m"} {
		dir := sharedtest.Path(b, filepath.Join("models", name))
		m, err := model.LoadWith(context.Background(), dir, model.LoadOptions{KeepDType: true})
		if err != nil {
			b.Fatal(err)
		}
		for _, depth := range []int{0, 1024, 4096} {
			b.Run(fmt.Sprintf("%s/depth%d", name, depth), func(b *testing.B) {
				r, err := NewRunnerWith(m, kernels.NewNative(), Options{MaxPositions: depth + 64, CacheDType: kernels.RowBF16})
				if err != nil {
					b.Fatal(err)
				}
				c := r.NewCache()
				c.Reserve(depth + 64)
				ids := make([]int, depth+1)
				for i := range ids {
					ids[i] = (i * 7919) % m.Config.VocabSize
				}
				logits, err := r.Forward(context.Background(), c, ids[:max(depth, 1)], false)
				if err != nil {
					b.Fatal(err)
				}
				if depth == 0 {
					c.Reset()
				}
				tok := []int{5}
				for b.Loop() {
					if c.Len() >= depth+63 {
						c.Truncate(depth)
					}
					if logits, err = r.ForwardInto(context.Background(), c, tok, false, logits); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
			})
		}
	}
}
