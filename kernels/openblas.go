//go:build openblas && (linux || darwin) && (amd64 || arm64)

package kernels

import (
	"fmt"
	"runtime"
	"strings"

	"github.com/ebitengine/purego"
	"github.com/transmla/transmla/internal/gemm"
)

// openblasLibs are the shared libraries tried, in order.
var openblasLibs = map[string][]string{
	"linux": {
		"libopenblas.so.0", "libopenblas.so",
		"/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
		"/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
	},
	"darwin": {
		"libopenblas.dylib",
		"/opt/homebrew/opt/openblas/lib/libopenblas.dylib",
		"/usr/local/opt/openblas/lib/libopenblas.dylib",
	},
}

// CBLAS enumerations.
const (
	cblasRowMajor = 101
	cblasNoTrans  = 111
	cblasTrans    = 112
)

// OpenBLAS is the Backend on the system's OpenBLAS, loaded at run time
// without cgo. Build with -tags openblas to include it.
type OpenBLAS struct {
	sgemm func(layout, ta, tb, m, n, k int32, alpha float32, a *float32, lda int32, b *float32, ldb int32, beta float32, c *float32, ldc int32)
	lib   string
}

// NewOpenBLAS loads OpenBLAS and sets its thread count to GOMAXPROCS.
func NewOpenBLAS() (*OpenBLAS, error) {
	var (
		h    uintptr
		err  error
		used string
	)
	libs := openblasLibs[runtime.GOOS]
	for _, name := range libs {
		if h, err = purego.Dlopen(name, purego.RTLD_NOW|purego.RTLD_GLOBAL); err == nil {
			used = name
			break
		}
	}
	if used == "" {
		return nil, fmt.Errorf("openblas: no shared library found (tried %s); install it with `apt-get install libopenblas0` (Debian/Ubuntu) or `brew install openblas` (macOS)", strings.Join(libs, ", "))
	}
	o := &OpenBLAS{lib: used}
	if err := registerFunc(&o.sgemm, h, "cblas_sgemm"); err != nil {
		return nil, fmt.Errorf("openblas: %s: %w", used, err)
	}
	var setThreads func(int32)
	if registerFunc(&setThreads, h, "openblas_set_num_threads") == nil {
		setThreads(int32(runtime.GOMAXPROCS(0)))
	}
	return o, nil
}

// registerFunc binds fptr to a symbol, turning a missing one into an error
// rather than purego's panic.
func registerFunc(fptr any, h uintptr, name string) error {
	sym, err := purego.Dlsym(h, name)
	if err != nil {
		return fmt.Errorf("symbol %s: %w", name, err)
	}
	purego.RegisterFunc(fptr, sym)
	return nil
}

// Name implements Backend.
func (o *OpenBLAS) Name() string { return "openblas" }

// Library is the shared library that was loaded.
func (o *OpenBLAS) Library() string { return o.lib }

// Gemm implements Backend.
func (o *OpenBLAS) Gemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	gemm.CheckShapes("kernels", transA, transB, m, n, k, a, lda, b, ldb, c, ldc)
	if m == 0 || n == 0 {
		return
	}
	if k == 0 {
		gemm.Scale(m, n, beta, c, ldc)
		return
	}
	ta, tb := int32(cblasNoTrans), int32(cblasNoTrans)
	if transA {
		ta = cblasTrans
	}
	if transB {
		tb = cblasTrans
	}
	// BLAS requires leading dimensions ≥ 1 even for a single column.
	o.sgemm(cblasRowMajor, ta, tb, int32(m), int32(n), int32(k), alpha, &a[0], int32(max(lda, 1)), &b[0], int32(max(ldb, 1)), beta, &c[0], int32(max(ldc, 1)))
}

func newOpenBLASBackend() (Backend, error) { return NewOpenBLAS() }
