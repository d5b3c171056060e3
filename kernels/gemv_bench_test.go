package kernels

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkDecodeProducts runs the single-row products of one decode step
// of llama-gqa-25m's shapes (6 layers of q/k/v, o, gate/up, down and the
// 4096-row LM head) with random weights of each dtype, and reports the
// weight bytes read per second: what bounds decoding at short contexts.
func BenchmarkDecodeProducts(b *testing.B) {
	const D, I, L, V = 768, 896, 6, 4096
	for _, dt := range []RowDType{RowBF16, RowF32} {
		b.Run(dt.String(), func(b *testing.B) {
			rng := rand.New(rand.NewPCG(1, 1))
			type layer struct{ q, k, v, o, gate, up, down Mat }
			mk := func(r, c int) Mat { m, _ := randMat(rng, r, c, dt); return m }
			ls := make([]layer, L)
			var bytes int64
			for i := range ls {
				ls[i] = layer{mk(D, D), mk(256, D), mk(256, D), mk(D, D), mk(I, D), mk(I, D), mk(D, I)}
				for _, m := range []Mat{ls[i].q, ls[i].k, ls[i].v, ls[i].o, ls[i].gate, ls[i].up, ls[i].down} {
					bytes += m.Bytes()
				}
			}
			head := mk(V, D)
			bytes += head.Bytes()
			x, q, kv, g, u, logits := randSlice(rng, I), make([]float32, D), make([]float32, 512), make([]float32, I), make([]float32, I), make([]float32, V)
			be := NewNative()
			b.SetBytes(bytes)
			for b.Loop() {
				for _, l := range ls {
					Project(be, x[:D], 1, Projection{W: l.q, Dst: q}, Projection{W: l.k, Dst: kv[:256]}, Projection{W: l.v, Dst: kv[256:]})
					Project(be, x[:D], 1, Projection{W: l.o, Dst: q})
					Project(be, x[:D], 1, Projection{W: l.gate, Dst: g}, Projection{W: l.up, Dst: u})
					Project(be, x[:I], 1, Projection{W: l.down, Dst: q})
				}
				Project(be, x[:D], 1, Projection{W: head, Dst: logits})
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "steps/s")
			_ = fmt.Sprint()
		})
	}
}

// BenchmarkGemvKernel is one 16-bit product of 4096×768 on one thread, in
// cache (64 rows) and from memory (4096 rows).
func BenchmarkGemvKernel(b *testing.B) {
	for _, dt := range []RowDType{RowBF16, RowF16, RowF32} {
		for _, rows := range []int{64, 4096, 32768} {
			for _, threads := range []int{1, 2} {
				b.Run(fmt.Sprintf("%s/rows%d/t%d", dt, rows, threads), func(b *testing.B) {
					rng := rand.New(rand.NewPCG(1, 1))
					w, _ := randMat(rng, rows, 768, dt)
					x, y := randSlice(rng, 768), make([]float32, rows)
					be := &Native{Threads: threads}
					b.SetBytes(w.Bytes())
					for b.Loop() {
						Linear(be, y, x, w, nil, 1)
					}
				})
			}
		}
	}
}
