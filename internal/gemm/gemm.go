// Package gemm holds what the module's two GEMM drivers — kernels
// (float32, inference) and internal/f64 (float64, factorizations) — share,
// written once for both element types: shape checks, scaling C, panel
// packing, the macro-kernel loop over register tiles and the portable
// fallbacks. The drivers keep what differs: their micro-kernels, cache
// blocks and how they split work over goroutines.
//
// Matrices are row-major slices with a row stride, as in BLAS.
package gemm

import "fmt"

// Float is the element type of a product.
type Float interface{ ~float32 | ~float64 }

// Tile is a register-tile micro-kernel: it accumulates the mr×nr product
// of packed panels (kc steps of mr values of A, kc steps of nr values of
// B) and stores C = alpha·acc when overwrite ≠ 0, else C += alpha·acc, at
// c[0] with row stride ldc. Callers guarantee len(a) ≥ kc·mr,
// len(b) ≥ kc·nr and len(c) ≥ (mr−1)·ldc+nr: assembly tiles do not check.
type Tile[T Float] func(kc int, a, b, c []T, ldc int, alpha T, overwrite int)

// Interleave writes dst[p·dstStride+i] = src[i·ld+p] for p < kc and
// i < rows (at most 16): the transposing copy of panel packing.
type Interleave[T Float] func(kc int, src []T, ld, rows int, dst []T, dstStride int)

// CheckShapes panics, naming pkg, unless op(A) (m×k), op(B) (k×n) and C
// (m×n) fit their slices with their strides, as an index out of range
// would. A nil b is not checked (the caller's B is not a slice).
func CheckShapes[T Float](pkg string, transA, transB bool, m, n, k int, a []T, lda int, b []T, ldb int, c []T, ldc int) {
	if m < 0 || n < 0 || k < 0 {
		panic(fmt.Sprintf("%s: negative gemm size %d×%d×%d", pkg, m, n, k))
	}
	ar, ac := m, k
	if transA {
		ar, ac = k, m
	}
	br, bc := k, n
	if transB {
		br, bc = n, k
	}
	need(pkg, "A", len(a), ar, ac, lda)
	if b != nil {
		need(pkg, "B", len(b), br, bc, ldb)
	}
	need(pkg, "C", len(c), m, n, ldc)
}

// need panics unless a matrix of rows×cols with stride ld fits in size
// values.
func need(pkg, what string, size, rows, cols, ld int) {
	if rows == 0 || cols == 0 {
		return
	}
	if (rows > 1 && ld < cols) || size < (rows-1)*ld+cols {
		panic(fmt.Sprintf("%s: gemm %s of %d×%d with stride %d needs %d values, has %d", pkg, what, rows, cols, ld, (rows-1)*ld+cols, size))
	}
}

// Scale sets C = beta·C for the m×n C, writing zeros (not 0·NaN) when
// beta is 0.
func Scale[T Float](m, n int, beta T, c []T, ldc int) {
	for i := range m {
		row := c[i*ldc : i*ldc+n]
		if beta == 0 {
			clear(row)
			continue
		}
		for j := range row {
			row[j] *= beta
		}
	}
}

// Macro multiplies packed A (mc rows, panels of mr) by the packed B panels
// (of nr) of columns j0..j1 of an nc-column block (j0 a multiple of nr; j1
// one too, or nc), into C at its block's corner: full tiles straight into
// C, edge tiles through edge (mr·nr values). ow is the tiles' overwrite.
func Macro[T Float](tile Tile[T], mr, nr, kc, mc, nc, j0, j1 int, alpha T, ap, bp, c []T, ldc, ow int, edge []T) {
	for jr := j0; jr < j1; jr += nr {
		w := min(nr, nc-jr)
		bpan := bp[jr*kc : (jr+nr)*kc]
		for ir := 0; ir < mc; ir += mr {
			h := min(mr, mc-ir)
			apan := ap[ir*kc : (ir+mr)*kc]
			off := ir*ldc + jr
			if h == mr && w == nr {
				tile(kc, apan, bpan, c[off:off+(mr-1)*ldc+nr], ldc, alpha, ow)
				continue
			}
			tile(kc, apan, bpan, edge, nr, alpha, 1)
			for i := range h {
				dst := c[off+i*ldc : off+i*ldc+w]
				src := edge[i*nr : i*nr+w]
				if ow != 0 {
					copy(dst, src)
					continue
				}
				for j, v := range src {
					dst[j] += v
				}
			}
		}
	}
}

// PackA writes op(A)[ic:ic+mc, pc:pc+kc] as panels of mr rows, each kc
// steps of mr values, zero-padding the last panel; only the panels of rows
// i0..i1 of the block (i0 a multiple of mr).
func PackA[T Float](interleave Interleave[T], dst []T, transA bool, a []T, lda, ic, pc, mc, kc, mr, i0, i1 int) {
	for ir := i0; ir < i1; ir += mr {
		h := min(mr, mc-ir)
		pan := dst[ir*kc : ir*kc+kc*mr]
		if transA {
			for p := range kc {
				copy(pan[p*mr:p*mr+h], a[(pc+p)*lda+ic+ir:(pc+p)*lda+ic+ir+h])
			}
		} else {
			for i := 0; i < h; i += 16 {
				interleave(kc, a[(ic+ir+i)*lda+pc:], lda, min(16, h-i), pan[i:], mr)
			}
		}
		PadPanel(pan, kc, h, mr)
	}
}

// PackB writes op(B)[pc:pc+kc, jc:jc+nc] as panels of nr columns, each kc
// steps of nr values, zero-padding the last panel; only the panels of
// columns j0..j1 of the block (j0 a multiple of nr).
func PackB[T Float](interleave Interleave[T], dst []T, transB bool, b []T, ldb, pc, jc, kc, nc, nr, j0, j1 int) {
	for jr := j0; jr < j1; jr += nr {
		w := min(nr, nc-jr)
		pan := dst[jr*kc : jr*kc+kc*nr]
		if transB {
			for j := 0; j < w; j += 16 {
				interleave(kc, b[(jc+jr+j)*ldb+pc:], ldb, min(16, w-j), pan[j:], nr)
			}
		} else {
			for p := range kc {
				copy(pan[p*nr:p*nr+w], b[(pc+p)*ldb+jc+jr:(pc+p)*ldb+jc+jr+w])
			}
		}
		PadPanel(pan, kc, w, nr)
	}
}

// PadPanel zeroes values used..width of each of the kc steps of a packed
// panel whose last rows or columns are missing.
func PadPanel[T Float](pan []T, kc, used, width int) {
	if used == width {
		return
	}
	for p := range kc {
		clear(pan[p*width+used : p*width+width])
	}
}

// InterleaveGo is the portable Interleave.
func InterleaveGo[T Float](kc int, src []T, ld, rows int, dst []T, dstStride int) {
	for i := range rows {
		for p, v := range src[i*ld : i*ld+kc] {
			dst[p*dstStride+i] = v
		}
	}
}

// DotGo is Σ x[i]·y[i] with four partial sums, as vector code keeps
// several (the tail goes to the first): the portable dot product of both
// drivers.
func DotGo[T Float](x, y []T) T {
	y = y[:len(x)]
	var s0, s1, s2, s3 T
	i := 0
	for ; i+4 <= len(x); i += 4 {
		s0 += x[i] * y[i]
		s1 += x[i+1] * y[i+1]
		s2 += x[i+2] * y[i+2]
		s3 += x[i+3] * y[i+3]
	}
	for ; i < len(x); i++ {
		s0 += x[i] * y[i]
	}
	return (s0 + s1) + (s2 + s3)
}

// Dot4Go writes out[r] = DotGo(x[:k], b[r·ldb:r·ldb+k]) for r < 4 and
// returns k: the portable form of the drivers' dot4 helpers.
func Dot4Go[T Float](k int, x, b []T, ldb int, out *[4]T) int {
	for r := range 4 {
		out[r] = DotGo(x[:k], b[r*ldb:r*ldb+k])
	}
	return k
}
