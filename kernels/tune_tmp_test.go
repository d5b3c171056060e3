package kernels

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

func BenchmarkTuneAttn(b *testing.B) {
	type shape struct {
		name                string
		groups, per, dk, dv int
		mla                 bool
	}
	for _, sh := range []shape{{"qwen", 4, 2, 64, 64, false}, {"qwen1g", 1, 2, 64, 64, false}, {"llama", 2, 3, 128, 128, false}, {"llama1g", 1, 3, 128, 128, false}, {"mla192", 1, 6, 256, 192, true}} {
		for _, ctx := range []int{1024, 4096, 16384} {
			for _, layers := range []int{1, 6} {
				b.Run(fmt.Sprintf("%s/ctx%d/layers%d", sh.name, ctx, layers), func(b *testing.B) {
					a := RowAttention{KeyDim: sh.dk, ValueDim: sh.dv, PerPosition: sh.per, Scale: 0.1, Workers: 1}
					width := sh.groups * (sh.dk + sh.dv)
					if sh.mla {
						width = sh.dk
					}
					for g := range sh.groups {
						a.KeyOffsets = append(a.KeyOffsets, g*sh.dk)
						if sh.mla {
							a.ValueOffsets = append(a.ValueOffsets, 0)
						} else {
							a.ValueOffsets = append(a.ValueOffsets, sh.groups*sh.dk+g*sh.dv)
						}
					}
					rng := rand.New(rand.NewPCG(1, 2))
					var rs []*Rows
					for range layers {
						rows := NewRows(width, DefaultPageRows, RowBF16)
						rows.Write(0, randSlice(rng, ctx*width))
						rs = append(rs, rows)
					}
					q, out := make([][]float32, sh.groups), make([][]float32, sh.groups)
					for g := range q {
						q[g], out[g] = randSlice(rng, sh.per*sh.dk), make([]float32, sh.per*sh.dv)
					}
					be, scratch := NewNative(), &AttendScratch{}
					b.SetBytes(int64(layers) * rs[0].BytesAllocated())
					for b.Loop() {
						for _, rows := range rs {
							a.Attend(be, scratch, out, q, 1, ctx-1, rows)
						}
					}
				})
			}
		}
	}
}
