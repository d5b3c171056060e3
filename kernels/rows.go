package kernels

import (
	"fmt"

	"github.com/transmla/transmla/safetensors"
)

// RowDType is the storage type of the values in a Rows store.
type RowDType int

// Row storage types.
const (
	RowF32 RowDType = iota
	RowBF16
	RowF16
)

// Bytes is the size of one value.
func (d RowDType) Bytes() int {
	if d == RowF32 {
		return 4
	}
	return 2
}

// String is the name --cache-dtype takes.
func (d RowDType) String() string {
	switch d {
	case RowBF16:
		return "bf16"
	case RowF16:
		return "f16"
	}
	return "f32"
}

// ParseRowDType maps "f32", "bf16" and "f16" to their RowDType.
func ParseRowDType(name string) (RowDType, error) {
	for _, d := range []RowDType{RowF32, RowBF16, RowF16} {
		if d.String() == name {
			return d, nil
		}
	}
	return 0, fmt.Errorf("cache dtype %q is not one of f32, bf16, f16", name)
}

// Rows is a paged store of fixed-width rows: the KV cache of one layer, one
// row per position. Pages of pageRows rows (see NewRows) are allocated as
// positions are written, so the memory held follows the longest sequence
// seen, not the model's maximum context. Values are rounded to the store's
// dtype (to nearest, ties to even) when written and widened to float32 when
// read.
type Rows struct {
	width, pageRows int
	dtype           RowDType
	pages16         [][]uint16
	pages32         [][]float32
	n               int
}

// DefaultPageRows is the page size of caches: a tile of the attention
// kernels, small enough to stay in L2 when widened.
const DefaultPageRows = 128

// NewRows returns an empty store of rows of width values.
func NewRows(width, pageRows int, dt RowDType) *Rows {
	return &Rows{width: width, pageRows: pageRows, dtype: dt}
}

// Width is the number of values per row.
func (r *Rows) Width() int { return r.width }

// Len is the number of rows written.
func (r *Rows) Len() int { return r.n }

// DType is the storage type.
func (r *Rows) DType() RowDType { return r.dtype }

// Truncate forgets the rows from n on, keeping the pages for reuse.
func (r *Rows) Truncate(n int) { r.n = min(r.n, max(n, 0)) }

// BytesAllocated is the memory held by the pages.
func (r *Rows) BytesAllocated() int64 {
	pages := len(r.pages16) + len(r.pages32)
	return int64(pages) * int64(r.pageRows) * int64(r.width) * int64(r.dtype.Bytes())
}

// Reserve allocates the pages for n rows.
func (r *Rows) Reserve(n int) {
	for r.pages() < (n+r.pageRows-1)/r.pageRows {
		if r.dtype == RowF32 {
			r.pages32 = append(r.pages32, make([]float32, r.pageRows*r.width))
		} else {
			r.pages16 = append(r.pages16, make([]uint16, r.pageRows*r.width))
		}
	}
}

func (r *Rows) pages() int { return len(r.pages16) + len(r.pages32) }

// Write stores len(src)/Width rows at positions i, i+1, …; i must not be
// beyond Len. Rows after the last written one are forgotten.
func (r *Rows) Write(i int, src []float32) {
	rows := len(src) / r.width
	if i > r.n {
		panic(fmt.Sprintf("kernels: row write at %d leaves a gap after %d rows", i, r.n))
	}
	r.Reserve(i + rows)
	if per := max(1, parallelElems/r.width); rows >= 2*per {
		// A prefill's rows are converted on all cores.
		Parallel(0, (rows+per-1)/per, TaskFunc(func(_, c int) {
			r.writeRows(i, src, c*per, min(rows, (c+1)*per))
		}))
	} else {
		r.writeRows(i, src, 0, rows)
	}
	r.n = i + rows
}

// writeRows stores rows [k0, k1) of src at positions i+k0…; the pages are
// reserved.
func (r *Rows) writeRows(i int, src []float32, k0, k1 int) {
	for k := k0; k < k1; k++ {
		p, o := (i+k)/r.pageRows, (i+k)%r.pageRows*r.width
		row := src[k*r.width : (k+1)*r.width]
		switch r.dtype {
		case RowF32:
			copy(r.pages32[p][o:o+r.width], row)
		case RowBF16:
			dst := r.pages16[p][o : o+r.width]
			for j, v := range row {
				dst[j] = safetensors.Float32ToBF16(v)
			}
		case RowF16:
			dst := r.pages16[p][o : o+r.width]
			for j, v := range row {
				dst[j] = safetensors.Float32ToF16(v)
			}
		}
	}
}

// Read widens rows [i0, i1) into dst, (i1−i0)×Width values.
func (r *Rows) Read(dst []float32, i0, i1 int) {
	for i := i0; i < i1; {
		p, o := i/r.pageRows, i%r.pageRows
		k := min(i1-i, r.pageRows-o)
		r.readPage(dst[(i-i0)*r.width:(i-i0+k)*r.width], p, o, o+k)
		i += k
	}
}

// readPage widens rows [o0, o1) of page p into dst.
func (r *Rows) readPage(dst []float32, p, o0, o1 int) {
	lo, hi := o0*r.width, o1*r.width
	switch r.dtype {
	case RowF32:
		copy(dst, r.pages32[p][lo:hi])
	case RowBF16:
		widenBF16(dst, r.pages16[p][lo:hi])
	case RowF16:
		widenF16(dst, r.pages16[p][lo:hi])
	}
}

// page returns rows [o0, o1) of page p as float32: the page itself for f32
// stores, else widened into buf.
func (r *Rows) page(buf []float32, p, o0, o1 int) []float32 {
	if r.dtype == RowF32 {
		return r.pages32[p][o0*r.width : o1*r.width]
	}
	buf = buf[:(o1-o0)*r.width]
	r.readPage(buf, p, o0, o1)
	return buf
}

// page16 returns rows [o0, o1) of page p of a 16-bit store as stored.
func (r *Rows) page16(p, o0, o1 int) []uint16 {
	return r.pages16[p][o0*r.width : o1*r.width]
}

// widenBF16 writes the float32 value of every bfloat16 in src to dst; the
// conversion is exact.
func widenBF16(dst []float32, src []uint16) {
	done := widenBF16SIMD(dst, src)
	for j, h := range src[done:] {
		dst[done+j] = safetensors.BF16ToFloat32(h)
	}
}

// CopyFrom makes r a copy of src's rows; both must have the same width,
// dtype and page size.
func (r *Rows) CopyFrom(src *Rows) error {
	if r.width != src.width || r.dtype != src.dtype || r.pageRows != src.pageRows {
		return fmt.Errorf("kernels: copying rows of width %d %v in pages of %d rows into width %d %v in pages of %d rows",
			src.width, src.dtype, src.pageRows, r.width, r.dtype, r.pageRows)
	}
	r.Reserve(src.n)
	for p := range (src.n + src.pageRows - 1) / src.pageRows {
		if r.dtype == RowF32 {
			copy(r.pages32[p], src.pages32[p])
		} else {
			copy(r.pages16[p], src.pages16[p])
		}
	}
	r.n = src.n
	return nil
}
