//go:build !amd64

package f64

// simdKernel: no assembly kernels off amd64.
func simdKernel() *kernel { return nil }
