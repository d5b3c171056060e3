package convert

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/internal/synthtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/tokenizer"
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

// The attention profile is each head's softmax weights summed by distance
// over the sampled query positions, divided by their count: checked
// against a float64 attention computed here from the layer's weights, with
// a rotate-half RoPE written out, q/k biases and GQA groups.
func TestProfileAccumulatorMatchesNaive(t *testing.T) {
	rng := rand.New(rand.NewPCG(41, 42))
	cfg := model.Config{HiddenSize: 24, NumHeads: 4, NumKVHeads: 2, HeadDim: 8, Rope: rope.Params{Dim: 8, Theta: 100}}
	lin := func(out int) model.Linear {
		l := model.Linear{W: make([]float32, out*cfg.HiddenSize), B: make([]float32, out)}
		for i := range l.W {
			l.W[i] = float32(rng.NormFloat64() * 0.4)
		}
		for i := range l.B {
			l.B[i] = float32(rng.NormFloat64() * 0.2)
		}
		return l
	}
	l := &model.Layer{Q: lin(4 * 8), K: lin(2 * 8)}
	const T, seqs = 19, 3
	p, err := newProfileAccumulator(kernels.NewNative(), cfg, l, T)
	if err != nil {
		t.Fatal(err)
	}
	inv, _, _ := cfg.Rope.InvFreq()
	want := make([][]float64, 4)
	for h := range want {
		want[h] = make([]float64, T)
	}
	var rows float64
	for range seqs {
		x := make([]float32, T*24)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		p.add(x, T)
		proj := func(lin model.Linear, t, o int) float64 {
			s := float64(lin.B[o])
			for i := range 24 {
				s += float64(lin.W[o*24+i]) * float64(x[t*24+i])
			}
			return s
		}
		vec := func(lin model.Linear, t, head int) []float64 {
			v := make([]float64, 8)
			for i := range v {
				v[i] = proj(lin, t, head*8+i)
			}
			for j := range 4 {
				s, c := math.Sincos(float64(t) * inv[j])
				v[j], v[j+4] = v[j]*c-v[j+4]*s, v[j+4]*c+v[j]*s
			}
			return v
		}
		for tq := 0; tq < T; tq += profileQueryStride {
			for h := range 4 {
				q := vec(l.Q, tq, h)
				sc := make([]float64, tq+1)
				var z float64
				for s := range sc {
					k := vec(l.K, s, h/2)
					for i := range 8 {
						sc[s] += q[i] * k[i] / math.Sqrt(8)
					}
				}
				m := slices.Max(sc)
				for s := range sc {
					sc[s] = math.Exp(sc[s] - m)
					z += sc[s]
				}
				for s := range sc {
					want[h][tq-s] += sc[s] / z
				}
			}
			rows++
		}
	}
	got := p.profile()
	for h := range want {
		var total float64
		for dist, w := range want[h] {
			w /= rows
			total += got[h][dist]
			if math.Abs(got[h][dist]-w) > 1e-5 {
				t.Fatalf("head %d distance %d: share %v, want %v", h, dist, got[h][dist], w)
			}
		}
		if math.Abs(total-1) > 1e-9 {
			t.Errorf("head %d: shares sum to %v, want 1", h, total)
		}
	}
}

// Held-out tokens never enter calibration, and a text too short for the
// sequences asked for is said so.
func TestCalibrationHoldsOutAndNotesOverlap(t *testing.T) {
	src := synthtest.Checkpoint(t, model.DefaultSynthetic())
	// Numbered lines: every window of the text occurs once.
	var b strings.Builder
	for i := range 500 {
		fmt.Fprintf(&b, "line %d of the calibration text\n", i)
	}
	calib := filepath.Join(t.TempDir(), "numbered.txt")
	if err := os.WriteFile(calib, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	text, _ := os.ReadFile(calib)
	tok, err := tokenizer.Load(filepath.Join(src, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	ids := tok.Encode(string(text), true)
	cfg, err := model.LoadConfig(src)
	if err != nil {
		t.Fatal(err)
	}
	const hold = 1000
	st := &stream{src: cfg, job: Job{Source: src}, be: kernels.NewNative()}
	if _, err := st.prepareCalibration(&Calibration{File: calib, Tokens: 4096, SeqLen: 64, Seed: 1, HoldOut: hold}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(st.heldOut, ids[len(ids)-hold:]) {
		t.Fatalf("held out %d tokens, not the file's last %d", len(st.heldOut), hold)
	}
	kept := len(ids) - hold
	for _, s := range st.seqs {
		// Each sequence is a window of the text; find where it starts.
		at := -1
		for i := 0; i+len(s) <= len(ids); i++ {
			if slices.Equal(ids[i:i+len(s)], s) {
				at = i
				break
			}
		}
		if at < 0 || at+len(s) > kept {
			t.Fatalf("a calibration sequence (at %d) is not within the first %d tokens", at, kept)
		}
	}
	if len(st.notes) != 0 {
		t.Errorf("notes %q for a text long enough", st.notes)
	}
	st = &stream{src: cfg, job: Job{Source: src}, be: kernels.NewNative()}
	if _, err := st.prepareCalibration(&Calibration{File: calib, Tokens: 64 * (len(ids)/64 + 5), SeqLen: 64, Seed: 1}); err != nil {
		t.Fatal(err)
	}
	if len(st.notes) != 1 || !strings.Contains(st.notes[0], "overlap") {
		t.Errorf("notes %q, want one saying that sequences overlap", st.notes)
	}
	if _, err := st.prepareCalibration(&Calibration{File: calib, Tokens: 64, SeqLen: 64, HoldOut: len(ids)}); err == nil {
		t.Error("holding out the whole text: no error")
	}
}
