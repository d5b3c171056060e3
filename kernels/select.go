package kernels

import (
	"fmt"
	"strings"
	"sync"
	"time"
)

// BackendNames lists the names Select accepts: "auto", "go" and "openblas".
func BackendNames() []string { return []string{"auto", "go", "openblas"} }

// Select returns the named Backend:
//
//   - "go": Native, this package's assembly/Go kernels, always available;
//   - "openblas": the system's OpenBLAS, loaded at run time; an error when
//     the binary was built without -tags openblas or the library is absent;
//   - "auto": Native, or, when OpenBLAS is loaded too, whichever of the two
//     is measured faster on each shape of product.
func Select(name string) (Backend, error) {
	switch name {
	case "go":
		return NewNative(), nil
	case "openblas":
		return newOpenBLASBackend()
	case "auto", "":
		nat := NewNative()
		ob, err := newOpenBLASBackend()
		if err != nil {
			return nat, nil
		}
		return &Auto{native: nat, other: ob, choice: map[shapeKey]*shapeStats{}}, nil
	}
	return nil, fmt.Errorf("unknown backend %q (want one of %s)", name, strings.Join(BackendNames(), ", "))
}

// Auto runs each product on whichever of two backends is faster for its
// shape. The first calls of a shape alternate between them and are timed;
// later calls go to the winner. Safe for concurrent use.
type Auto struct {
	native *Native
	other  Backend
	mu     sync.Mutex
	choice map[shapeKey]*shapeStats
}

// shapeKey classes products: m is rounded up to a power of two, since a
// forward pass sees every prefix length.
type shapeKey struct {
	transA, transB bool
	m, n, k        int
}

// trialsPerBackend is how many timed calls each backend gets per shape;
// the best of them counts, which discards a cold first call.
const trialsPerBackend = 2

type shapeStats struct {
	runs   [2]int
	best   [2]float64 // seconds per row of C
	winner int        // -1 while measuring
}

// Name implements Backend.
func (a *Auto) Name() string { return "auto(" + a.native.Name() + "," + a.other.Name() + ")" }

// Gemm implements Backend.
func (a *Auto) Gemm(transA, transB bool, m, n, k int, alpha float32, A []float32, lda int, B []float32, ldb int, beta float32, C []float32, ldc int) {
	if m == 0 || n == 0 {
		// Nothing to time: an empty C would record an infinite time per row
		// for the shape class of m = 1 and could decide it.
		a.native.Gemm(transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)
		return
	}
	mk := 1
	for mk < m {
		mk *= 2
	}
	key := shapeKey{transA, transB, mk, n, k}
	a.mu.Lock()
	st := a.choice[key]
	if st == nil {
		st = &shapeStats{winner: -1}
		a.choice[key] = st
	}
	pick := st.winner
	if pick < 0 {
		pick = 0
		if st.runs[1] < st.runs[0] {
			pick = 1
		}
		st.runs[pick]++ // claimed now, so concurrent callers spread out
	}
	measuring := st.winner < 0
	a.mu.Unlock()

	be := Backend(a.native)
	if pick == 1 {
		be = a.other
	}
	if !measuring {
		be.Gemm(transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)
		return
	}
	start := time.Now()
	be.Gemm(transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)
	d := time.Since(start).Seconds() / float64(m)
	a.mu.Lock()
	if st.best[pick] == 0 || d < st.best[pick] {
		st.best[pick] = d
	}
	if st.winner < 0 && st.runs[0] >= trialsPerBackend && st.runs[1] >= trialsPerBackend && st.best[0] > 0 && st.best[1] > 0 {
		st.winner = 0
		if st.best[1] < st.best[0] {
			st.winner = 1
		}
	}
	a.mu.Unlock()
}

// serial returns the native backend on one goroutine: callers that run
// one product per core (attention over heads) gain nothing from OpenBLAS's
// threads and would disturb its timings.
func (a *Auto) serial() Backend { return a.native.serial() }

// Serial returns the single-goroutine view of be, for callers that already
// run one product per core; be itself when it has none.
func Serial(be Backend) Backend { return serialBackend(be) }

// serialBackend returns the single-goroutine view of be when it has one.
func serialBackend(be Backend) Backend {
	if s, ok := be.(interface{ serial() Backend }); ok {
		return s.serial()
	}
	return be
}
