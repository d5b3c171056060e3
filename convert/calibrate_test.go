package convert

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/transmla/transmla/kernels"
)

// The accumulated moment is the float64 mean of x̃x̃ᵀ over all rows of all
// batches, to float32 product precision, symmetric.
func TestMomentAccumulatorMatchesNaive(t *testing.T) {
	rng := rand.New(rand.NewPCG(31, 32))
	for _, dim := range []int{1, 37, gramBlock + 3} {
		acc := newMomentAccumulator(kernels.NewNative(), dim)
		n1 := dim + 1
		want := make([]float64, n1*n1)
		total := 0
		for _, rows := range []int{5, 1, 9} {
			x := make([]float32, rows*dim)
			for i := range x {
				x[i] = float32(rng.NormFloat64() + 0.5)
			}
			acc.add(x, rows)
			for r := range rows {
				xt := make([]float64, n1)
				for j := range dim {
					xt[j] = float64(x[r*dim+j])
				}
				xt[dim] = 1
				for i := range n1 {
					for j := range n1 {
						want[i*n1+j] += xt[i] * xt[j]
					}
				}
			}
			total += rows
		}
		got := acc.moment()
		for i := range want {
			w := want[i] / float64(total)
			if math.Abs(got[i]-w) > 1e-5*(1+math.Abs(w)) {
				t.Fatalf("dim %d: entry (%d,%d) = %v, want %v", dim, i/n1, i%n1, got[i], w)
			}
		}
	}
}

// Calibration sizes that cannot work are refused before anything is
// allocated for them.
func TestCalibrationSequencesRejectsBadSizes(t *testing.T) {
	ids := make([]int, 1000)
	for _, tc := range []struct {
		name           string
		tokens, seqLen int
	}{
		{"sequence of one token", 100, 1},
		{"fewer tokens than a sequence", 100, 128},
		{"text shorter than a sequence", 2048, 1024},
		{"beyond the limit", MaxCalibrationTokens + 1, 512},
		{"beyond any allocation", math.MaxInt, 2},
	} {
		if seqs, err := CalibrationSequences(ids, tc.tokens, tc.seqLen, 1); err == nil {
			t.Errorf("%s: %d sequences, want an error", tc.name, len(seqs))
		}
	}
}
