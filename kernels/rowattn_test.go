package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/transmla/transmla/safetensors"
)

// naiveRowAttention is the float64 definition: every query row against
// every visible cached row, plain softmax.
func naiveRowAttention(a RowAttention, q [][]float32, n, past int, cache []float32, width int) [][]float64 {
	out := make([][]float64, len(q))
	for g, qg := range q {
		rowsQ := n * a.PerPosition
		out[g] = make([]float64, rowsQ*a.ValueDim)
		for r := range rowsQ {
			pos := past + r/a.PerPosition
			lo := 0
			if a.Window > 0 {
				lo = max(0, pos-a.Window+1)
			}
			scores := make([]float64, pos+1-lo)
			m := math.Inf(-1)
			for t := lo; t <= pos; t++ {
				var s float64
				for j := range a.KeyDim {
					s += float64(qg[r*a.KeyDim+j]) * float64(cache[t*width+a.KeyOffsets[g]+j])
				}
				s *= float64(a.Scale)
				scores[t-lo] = s
				m = math.Max(m, s)
			}
			var sum float64
			for i, s := range scores {
				scores[i] = math.Exp(s - m)
				sum += scores[i]
			}
			for t := lo; t <= pos; t++ {
				p := scores[t-lo] / sum
				for j := range a.ValueDim {
					out[g][r*a.ValueDim+j] += p * float64(cache[t*width+a.ValueOffsets[g]+j])
				}
			}
		}
	}
	return out
}

func TestRowAttentionMatchesNaive(t *testing.T) {
	cases := []struct {
		name                 string
		groups, per, dk, dv  int
		valueOffsetInsideKey bool // MLA: the value is the key's first dv values
		n, past, window      int
		page                 int
		dt                   RowDType
	}{
		{"gqa decode", 2, 3, 16, 16, false, 1, 300, 0, 32, RowF32},
		{"gqa prefill", 2, 3, 16, 16, false, 150, 0, 0, 32, RowBF16},
		{"gqa chunk after past", 4, 2, 8, 8, false, 70, 97, 0, 16, RowF16},
		{"mla decode long", 1, 6, 40, 32, true, 1, 2000, 0, 64, RowBF16},
		{"mla decode few", 1, 6, 40, 32, true, 3, 517, 0, 64, RowF32},
		{"mla prefill", 1, 5, 24, 16, true, 200, 0, 0, 16, RowBF16},
		{"window decode", 2, 2, 8, 8, false, 1, 400, 37, 16, RowF32},
		{"window prefill", 1, 4, 24, 16, true, 130, 20, 50, 16, RowBF16},
		// Decoding reads 16-bit rows as stored (odd widths, part pages).
		{"gqa decode bf16", 2, 3, 24, 20, false, 1, 301, 0, 32, RowBF16},
		{"gqa decode f16 window", 2, 2, 8, 8, false, 2, 400, 37, 16, RowF16},
		{"mla decode f16", 1, 6, 40, 32, true, 1, 999, 0, 64, RowF16},
		{"mla decode few bf16", 1, 5, 36, 19, true, 3, 130, 0, 16, RowBF16},
		// bf16 rows of whole 32-value blocks: the page kernels, 1 to 6
		// query rows at a time (8 heads: 6 + 2; 2 positions of 5: 6 + 4).
		{"paged gqa 1 row", 3, 1, 64, 32, false, 1, 301, 0, 32, RowBF16},
		{"paged gqa 3 rows", 2, 3, 128, 128, false, 1, 1000, 0, 128, RowBF16},
		{"paged gqa 4 rows window", 2, 4, 32, 64, false, 1, 400, 50, 16, RowBF16},
		{"paged mla 6 heads", 1, 6, 96, 64, true, 1, 777, 0, 64, RowBF16},
		{"paged mla 8 heads", 1, 8, 64, 32, true, 1, 250, 0, 128, RowBF16},
		{"paged mla 2 positions of 5", 1, 5, 64, 32, true, 2, 133, 0, 16, RowBF16},
		// More heads than smallRows at one position still read as stored.
		{"paged mla 32 heads", 1, 32, 64, 32, true, 1, 300, 0, 64, RowBF16},
		{"mla decode 20 heads f16", 1, 20, 40, 32, true, 1, 150, 0, 32, RowF16},
	}
	// One scratch for every case, so that its reuse across shapes is
	// tested; each case also runs with a fresh one.
	shared := &AttendScratch{}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(i), 11))
			a := RowAttention{KeyDim: tc.dk, ValueDim: tc.dv, PerPosition: tc.per, Scale: 1 / float32(math.Sqrt(float64(tc.dk))), Window: tc.window}
			width := tc.groups * (tc.dk + tc.dv)
			if tc.valueOffsetInsideKey {
				width = tc.groups * tc.dk
			}
			for g := range tc.groups {
				if tc.valueOffsetInsideKey {
					a.KeyOffsets = append(a.KeyOffsets, g*tc.dk)
					a.ValueOffsets = append(a.ValueOffsets, g*tc.dk)
				} else {
					a.KeyOffsets = append(a.KeyOffsets, g*tc.dk)
					a.ValueOffsets = append(a.ValueOffsets, tc.groups*tc.dk+g*tc.dv)
				}
			}
			total := tc.past + tc.n
			src := make([]float32, total*width)
			for j := range src {
				src[j] = float32(rng.NormFloat64())
			}
			rows := NewRows(width, tc.page, tc.dt)
			// Write in two pieces, as a prefill then a step would.
			rows.Write(0, src[:tc.past*width])
			rows.Write(tc.past, src[tc.past*width:])
			stored := make([]float32, total*width)
			rows.Read(stored, 0, total)
			q := make([][]float32, tc.groups)
			out := make([][]float32, tc.groups)
			for g := range q {
				q[g] = make([]float32, tc.n*tc.per*tc.dk)
				for j := range q[g] {
					q[g][j] = 2 * float32(rng.NormFloat64())
				}
				out[g] = make([]float32, tc.n*tc.per*tc.dv)
			}
			want := naiveRowAttention(a, q, tc.n, tc.past, stored, width)
			for _, scratch := range []*AttendScratch{nil, shared} {
				for g := range out {
					for j := range out[g] {
						out[g][j] = float32(math.NaN()) // poisoned: every value must be written
					}
				}
				a.Attend(NewNative(), scratch, out, q, tc.n, tc.past, rows)
				for g := range q {
					if e := relErr(out[g], want[g]); !(e < 2e-5) {
						t.Errorf("scratch %v, group %d: relative error %.3g", scratch != nil, g, e)
					}
				}
			}
		})
	}
}

// relErr is ‖got − want‖ / ‖want‖.
func relErr(got []float32, want []float64) float64 {
	var num, den float64
	for i, w := range want {
		d := float64(got[i]) - w
		num += d * d
		den += w * w
	}
	return math.Sqrt(num / den)
}

func TestRowsStoreRoundsAndCountsPages(t *testing.T) {
	for _, dt := range []RowDType{RowF32, RowBF16, RowF16} {
		t.Run(dt.String(), func(t *testing.T) {
			r := NewRows(3, 4, dt)
			src := []float32{1, 1.00390625, 1.01171875, -2, 0.1, 65504, 3, 4, 5}
			r.Write(0, src)
			if r.Len() != 3 || r.BytesAllocated() != int64(4*3*dt.Bytes()) {
				t.Fatalf("len %d, bytes %d", r.Len(), r.BytesAllocated())
			}
			got := make([]float32, 9)
			r.Read(got, 0, 3)
			for i, v := range src {
				want := v
				switch dt {
				case RowBF16:
					// 1.00390625 = 1 + 2⁻⁸ is a tie between 1 and 1 + 2⁻⁷: even is 1.
					want = map[float32]float32{1.00390625: 1, 1.01171875: 1.015625, 0.1: 0.10009765625, 65504: 65536}[v]
				case RowF16:
					want = map[float32]float32{0.1: 0.0999755859375}[v]
				}
				if want == 0 {
					want = v
				}
				if got[i] != want {
					t.Errorf("value %d: stored %v as %v, want %v", i, v, got[i], want)
				}
			}
			r.Write(3, make([]float32, 6))
			if r.BytesAllocated() != int64(8*3*dt.Bytes()) {
				t.Errorf("after 5 rows: %d bytes, want two pages", r.BytesAllocated())
			}
			r.Truncate(0)
			if r.Len() != 0 || r.BytesAllocated() != int64(8*3*dt.Bytes()) {
				t.Errorf("truncate: len %d bytes %d", r.Len(), r.BytesAllocated())
			}
		})
	}
}

// A prefill's write, converted on all cores, stores every value as the
// scalar conversion does, across pages, after rows already there.
func TestRowsLargeWrite(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	for _, dt := range []RowDType{RowF32, RowBF16, RowF16} {
		const width, rows = 40, 3001
		r := NewRows(width, 128, dt)
		head := randSlice(rng, 5*width)
		r.Write(0, head)
		src := randSlice(rng, rows*width)
		r.Write(5, src)
		if r.Len() != 5+rows {
			t.Fatalf("%v: %d rows, want %d", dt, r.Len(), 5+rows)
		}
		got := make([]float32, (5+rows)*width)
		r.Read(got, 0, 5+rows)
		for i, v := range append(head, src...) {
			want := v
			switch dt {
			case RowBF16:
				want = safetensors.BF16ToFloat32(safetensors.Float32ToBF16(v))
			case RowF16:
				want = safetensors.F16ToFloat32(safetensors.Float32ToF16(v))
			}
			if got[i] != want {
				t.Fatalf("%v: value %d stored as %v, want %v", dt, i, got[i], want)
			}
		}
	}
}

func TestWidenBF16MatchesScalar(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, n := range []int{0, 1, 15, 16, 17, 63, 64, 65, 200} {
		src := make([]uint16, n)
		for i := range src {
			src[i] = uint16(rng.Uint32())
		}
		got := make([]float32, n)
		widenBF16(got, src)
		for i, h := range src {
			want := math.Float32frombits(uint32(h) << 16)
			if math.Float32bits(got[i]) != math.Float32bits(want) {
				t.Fatalf("n=%d, value %d: %v, want %v", n, i, got[i], want)
			}
		}
	}
}

// BenchmarkRowAttentionDecode times one decode step of an MLA layer: 6
// heads of 192 + 64 (llama-gqa-25m at d_c 192) and 32 heads of 512 + 64
// (an 8B-sized conversion).
func BenchmarkRowAttentionDecode(b *testing.B) {
	for _, sh := range []struct{ heads, dc, dr int }{{6, 192, 64}, {32, 512, 64}} {
		for _, ctx := range []int{4096, 16384} {
			for _, dt := range []RowDType{RowBF16, RowF32} {
				benchDecodeStep(b, sh.heads, sh.dc, sh.dr, ctx, dt)
			}
		}
	}
}

func benchDecodeStep(b *testing.B, heads, dc, dr, ctx int, dt RowDType) {
	dk := dc + dr
	b.Run(fmt.Sprintf("mla_h%d_%d+%d_ctx%d_%s", heads, dc, dr, ctx, dt), func(b *testing.B) {
		a := RowAttention{KeyDim: dk, ValueDim: dc, PerPosition: heads, Scale: 0.1, KeyOffsets: []int{0}, ValueOffsets: []int{0}}
		rows := NewRows(dk, DefaultPageRows, dt)
		rows.Write(0, make([]float32, ctx*dk))
		q := [][]float32{make([]float32, heads*dk)}
		out := [][]float32{make([]float32, heads*dc)}
		be, scratch := NewNative(), &AttendScratch{}
		b.SetBytes(rows.BytesAllocated())
		b.ReportAllocs()
		for b.Loop() {
			a.Attend(be, scratch, out, q, 1, ctx-1, rows)
		}
	})
}

// CopyFrom gives a store the source's rows, over several pages and over a
// longer previous content, and refuses stores of another layout, naming
// what differs.
func TestRowsCopyFrom(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, dt := range []RowDType{RowF32, RowBF16, RowF16} {
		t.Run(dt.String(), func(t *testing.T) {
			src := NewRows(5, 8, dt)
			vals := randSlice(rng, 21*5)
			src.Write(0, vals)
			dst := NewRows(5, 8, dt)
			dst.Write(0, randSlice(rng, 30*5)) // longer: the extra rows go
			if err := dst.CopyFrom(src); err != nil {
				t.Fatal(err)
			}
			if dst.Len() != 21 {
				t.Fatalf("copy has %d rows, want 21", dst.Len())
			}
			got, want := make([]float32, 21*5), make([]float32, 21*5)
			dst.Read(got, 0, 21)
			src.Read(want, 0, 21)
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("value %d: %v, want %v", i, got[i], want[i])
				}
			}
		})
	}
	src := NewRows(5, 8, RowBF16)
	for _, tc := range []struct {
		dst  *Rows
		want string
	}{
		{NewRows(6, 8, RowBF16), "width 5"},
		{NewRows(5, 8, RowF16), "bf16"},
		{NewRows(5, 16, RowBF16), "pages of 8 rows"},
	} {
		if err := tc.dst.CopyFrom(src); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("copy into width %d %v pages of %d: error %v, want one containing %q", tc.dst.width, tc.dst.dtype, tc.dst.pageRows, err, tc.want)
		}
	}
}

// A decode step of many heads (an 8B-sized MLA layer: 32 heads against
// 512 + 64 latent rows, bf16) reads the cache as stored and allocates
// nothing, as one of few heads does.
func TestAttendDecodeManyHeadsAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts under the race detector mean nothing (sync.Pool drops items)")
	}
	if !smallBlocks16SIMD() {
		t.Skip("no 16-bit small-block kernels on this CPU: the portable code widens each page for the general product")
	}
	a := RowAttention{KeyDim: 576, ValueDim: 512, PerPosition: 32, Scale: 0.05, KeyOffsets: []int{0}, ValueOffsets: []int{0}}
	rng := rand.New(rand.NewPCG(3, 4))
	const ctx = 700
	rows := NewRows(576, DefaultPageRows, RowBF16)
	rows.Write(0, randSlice(rng, ctx*576))
	q := [][]float32{randSlice(rng, 32*576)}
	out := [][]float32{make([]float32, 32*512)}
	be, scratch := NewNative(), &AttendScratch{}
	a.Attend(be, scratch, out, q, 1, ctx-1, rows) // grows the scratch
	if allocs := testing.AllocsPerRun(20, func() { a.Attend(be, scratch, out, q, 1, ctx-1, rows) }); allocs != 0 {
		t.Errorf("%v allocations per decode step", allocs)
	}
}
