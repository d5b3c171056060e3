package kernels

import (
	"fmt"

	"github.com/transmla/transmla/safetensors"
)

// Mat is a row-major weight matrix held in the dtype it was stored with:
// float32, or the 16-bit bfloat16 or IEEE half values of a checkpoint,
// which the products widen to float32 exactly as they read them. Holding
// bf16 weights halves the bytes a decode step streams from memory, and the
// results are those of the widened float32 matrix. The zero Mat has no
// rows.
type Mat struct {
	rows, cols int
	dtype      RowDType
	f32        []float32
	u16        []uint16
}

// MatF32 views w (rows×cols, row-major) as a Mat.
func MatF32(rows, cols int, w []float32) Mat {
	checkMatLen(rows, cols, len(w))
	return Mat{rows: rows, cols: cols, dtype: RowF32, f32: w[:rows*cols]}
}

// Mat16 views bits (rows×cols, row-major) of bfloat16 (RowBF16) or IEEE
// half (RowF16) values as a Mat.
func Mat16(rows, cols int, dt RowDType, bits []uint16) Mat {
	if dt != RowBF16 && dt != RowF16 {
		panic(fmt.Sprintf("kernels: Mat16 of dtype %v", dt))
	}
	checkMatLen(rows, cols, len(bits))
	return Mat{rows: rows, cols: cols, dtype: dt, u16: bits[:rows*cols]}
}

func checkMatLen(rows, cols, n int) {
	if rows < 0 || cols < 0 || n < rows*cols {
		panic(fmt.Sprintf("kernels: matrix of %d×%d with %d values", rows, cols, n))
	}
}

// Rows is the matrix's row count (a projection's outputs).
func (m Mat) Rows() int { return m.rows }

// Cols is the matrix's column count (a projection's inputs).
func (m Mat) Cols() int { return m.cols }

// DType is the storage type of the values.
func (m Mat) DType() RowDType { return m.dtype }

// Bytes is the memory the values take, what a product reads of them.
func (m Mat) Bytes() int64 { return int64(m.rows) * int64(m.cols) * int64(m.dtype.Bytes()) }

// Slice is the Mat of rows [r0, r1), sharing m's values.
func (m Mat) Slice(r0, r1 int) Mat {
	if r0 < 0 || r1 < r0 || r1 > m.rows {
		panic(fmt.Sprintf("kernels: rows [%d, %d) of a matrix of %d", r0, r1, m.rows))
	}
	s := Mat{rows: r1 - r0, cols: m.cols, dtype: m.dtype}
	if m.dtype == RowF32 {
		s.f32 = m.f32[r0*m.cols : r1*m.cols]
	} else {
		s.u16 = m.u16[r0*m.cols : r1*m.cols]
	}
	return s
}

// Row widens row r into dst (Cols values).
func (m Mat) Row(dst []float32, r int) {
	m.widen(dst[:m.cols], r, 0, m.cols)
}

// widen writes the float32 values of row r, columns [c0, c1), into dst.
func (m Mat) widen(dst []float32, r, c0, c1 int) {
	o := r * m.cols
	switch m.dtype {
	case RowF32:
		copy(dst, m.f32[o+c0:o+c1])
	case RowBF16:
		widenBF16(dst, m.u16[o+c0:o+c1])
	case RowF16:
		widenF16(dst, m.u16[o+c0:o+c1])
	}
}

// Float32 is the matrix as float32 values: m's own for a float32 Mat,
// else a widened copy.
func (m Mat) Float32() []float32 {
	if m.dtype == RowF32 {
		return m.f32
	}
	out := make([]float32, m.rows*m.cols)
	for r := range m.rows {
		m.widen(out[r*m.cols:(r+1)*m.cols], r, 0, m.cols)
	}
	return out
}

// widenF16 writes the float32 value of every IEEE half in src to dst; the
// conversion is exact.
func widenF16(dst []float32, src []uint16) {
	done := widenF16SIMD(dst, src)
	for j, h := range src[done:] {
		dst[done+j] = safetensors.F16ToFloat32(h)
	}
}
