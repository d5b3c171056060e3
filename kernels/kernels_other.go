//go:build !amd64

package kernels

// simdKernels lists the assembly kernels this CPU can run: none off amd64.
func simdKernels() []*gemmKernel { return nil }

func softmaxSIMD(x []float32) bool { return false }

func swigluSIMD(gate, up []float32) bool { return false }

func expRowSIMD(x []float32) bool { return false }

func axpySIMD(a float32, x, y []float32) bool { return false }

func widenBF16SIMD(dst []float32, src []uint16) int { return 0 }

func maxSIMD(x []float32) (float32, bool) { return 0, false }

func expSubSIMD(x []float32, m float32) (float32, bool) { return 0, false }

func scaleSIMD(x []float32, s float32) bool { return false }

func scoresBlockSIMD(rows, k int, q []float32, ldq int, keys []float32, ldk int, out []float32, ldo int) bool {
	return false
}

func wsumBlockSIMD(rows, n int, w []float32, ldw int, v []float32, ldv int, o []float32, ldo int) bool {
	return false
}

func smallBlocksSIMD() bool { return false }

func widenF16SIMD(dst []float32, src []uint16) int { return 0 }

func gemv16Kernels() []*gemv16 { return nil }

func gemv16Arch(l simdLevel, dt RowDType, rows, k int, x []float32, w []uint16, ldw int, y []float32) {
	panic("kernels: no vector code")
}

func dot4Arch(l simdLevel, k int, x, b []float32, ldb int, out *[4]float32) (int, bool) {
	return 0, false
}

func rmsNormSIMD(dst, x, w []float32, eps float32) bool { return false }

func sumExp64SIMD(x []float32, m float32) (float64, bool) { return 0, false }

func scoresBlock16SIMD(dt RowDType, rows, k int, q []float32, ldq int, keys []uint16, ldk int, out []float32, ldo int) bool {
	return false
}

func wsumBlock16SIMD(dt RowDType, rows, n int, w []float32, ldw int, v []uint16, ldv int, o []float32, ldo int) bool {
	return false
}

func smallBlocks16SIMD() bool { return false }

func pageKernelsBF16() bool { return false }

func scoresPageBF16(rows, nt, dk int, q []float32, keys []uint16, ldk int, s []float32, lds int, nextKeys []uint16) {
	panic("kernels: no vector code")
}

func wsumPageBF16(rows, nt, dv int, w []float32, ldw int, v []uint16, ldv int, o []float32, nextValues []uint16) {
	panic("kernels: no vector code")
}
