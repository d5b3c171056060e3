//go:build !amd64

package kernels

// simdKernels lists the assembly kernels this CPU can run: none off amd64.
func simdKernels() []*gemmKernel { return nil }

func softmaxSIMD(x []float32) bool { return false }

func swigluSIMD(gate, up []float32) bool { return false }

func expRowSIMD(x []float32) bool { return false }

func axpySIMD(a float32, x, y []float32) bool { return false }
