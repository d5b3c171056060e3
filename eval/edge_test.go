package eval

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

// gqaConfig is a small Mistral-style GQA model: 4 query heads on 2 KV
// heads of 8, with q/k/v biases when biases is set.
func gqaConfig(window int, biases bool) model.Config {
	return model.Config{
		Architecture: "MistralForCausalLM", HiddenSize: 32, IntermediateSize: 40, NumLayers: 2,
		NumHeads: 4, NumKVHeads: 2, HeadDim: 8, VocabSize: 50, MaxPositionEmbeddings: 512, RMSNormEps: 1e-5,
		Rope:      rope.Params{Dim: 8, Theta: 10000},
		HiddenAct: "silu", BOSTokenID: -1, QKVBias: biases, SlidingWindow: window,
	}
}

// edgeTokens returns n token ids of a vocabulary of v, reproducibly.
func edgeTokens(n, v int) []int {
	ids := make([]int, n)
	for i := range ids {
		ids[i] = (i*37 + 11) % v
	}
	return ids
}

// A batch of sequences of different lengths — one across a cache page
// boundary, one of a single token — prefilled together and then decoded
// together, gives every position the logits of the float64 reference, with
// and without a sliding window, for GQA and for both MLA paths.
func TestForwardBatchMatchesReference(t *testing.T) {
	mlaWindowed := mlaCases[1].config()
	mlaWindowed.SlidingWindow = 7
	for _, tc := range []struct {
		name string
		m    *model.Model
		ref  func(*model.Model, []int) []float64
		path MLAPath
	}{
		{"gqa", randomModel(t, gqaConfig(0, true), 1), referenceGQA, PathAuto},
		{"gqa window 5", randomModel(t, gqaConfig(5, false), 2), referenceGQA, PathAuto},
		{"gqa window 130", randomModel(t, gqaConfig(130, true), 3), referenceGQA, PathAuto},
		{"mla window 7 absorbed", randomModel(t, mlaWindowed, 4), referenceMLA, PathAbsorbed},
		{"mla window 7 decompressed", randomModel(t, mlaWindowed, 4), referenceMLA, PathDecompressed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := NewRunnerWith(tc.m, kernels.NewNative(), Options{MaxPositions: 160, MLAPath: tc.path})
			if err != nil {
				t.Fatal(err)
			}
			V := tc.m.Config.VocabSize
			// Full lengths; the last two tokens of each are decoded one by one.
			lengths := []int{150, 3, 1 + 2, 9}
			seqs := make([][]int, len(lengths))
			for i, n := range lengths {
				seqs[i] = edgeTokens(n, V)
				for j := range seqs[i] {
					seqs[i][j] = (seqs[i][j] + 3*i) % V
				}
			}
			caches := make([]*KVCache, len(seqs))
			prompts := make([][]int, len(seqs))
			for i, s := range seqs {
				caches[i], prompts[i] = r.NewCache(), s[:len(s)-2]
			}
			got, err := r.ForwardBatch(context.Background(), caches, prompts, true)
			if err != nil {
				t.Fatal(err)
			}
			for step := range 2 {
				next := make([][]int, len(seqs))
				for i, s := range seqs {
					next[i] = s[len(s)-2+step : len(s)-1+step]
				}
				out, err := r.ForwardBatch(context.Background(), caches, next, false)
				if err != nil {
					t.Fatal(err)
				}
				for i := range got {
					got[i] = append(got[i], out[i]...)
				}
			}
			for i, s := range seqs {
				want := tc.ref(tc.m, s)
				for p := range s {
					if e := maxRelErr(got[i][p*V:(p+1)*V], want[p*V:(p+1)*V]); !(e < 1e-5) {
						t.Fatalf("sequence %d (length %d), position %d: logits differ from the float64 reference by %.3g", i, len(s), p, e)
					}
				}
			}
		})
	}
}

// Bad arguments to the runner give errors that say what is wrong, never a
// panic (some of these used to crash a worker goroutine) or a silently
// wrong result (a cache shared by two sequences of a batch, a cache dtype
// that stores nothing).
func TestRunnerRejectsBadInput(t *testing.T) {
	ctx := context.Background()
	m := randomModel(t, gqaConfig(0, false), 1)
	r, err := NewRunner(m, kernels.NewNative(), 8)
	if err != nil {
		t.Fatal(err)
	}
	other, err := NewRunner(randomModel(t, mlaCases[0].config(), 1), kernels.NewNative(), 8)
	if err != nil {
		t.Fatal(err)
	}
	longer, err := NewRunner(m, kernels.NewNative(), 100)
	if err != nil {
		t.Fatal(err)
	}
	forward := func(caches []*KVCache, tokens ...[]int) func() error {
		return func() error {
			_, err := r.ForwardBatch(ctx, caches, tokens, false)
			return err
		}
	}
	shared := r.NewCache()
	for _, tc := range []struct {
		name string
		run  func() error
		want string // "" for success
	}{
		{"exactly max positions", forward([]*KVCache{r.NewCache()}, edgeTokens(8, 50)), ""},
		{"beyond max positions", forward([]*KVCache{r.NewCache()}, edgeTokens(9, 50)), "9 positions exceed"},
		{"nil cache", forward([]*KVCache{r.NewCache(), nil}, []int{1}, []int{2}), "cache of sequence 1 is nil"},
		{"cache shared by two sequences", forward([]*KVCache{shared, shared}, []int{1}, []int{2}), "sequences 0 and 1 share one cache"},
		{"cache of another model", forward([]*KVCache{other.NewCache()}, []int{1}), "rows of 16 values"},
		{"cache longer than the runner", forward([]*KVCache{longer.NewCache()}, edgeTokens(20, 50)), "20 positions exceed the runner's 8"},
		{"zero max positions", func() error { _, err := NewRunner(m, kernels.NewNative(), 0); return err }, "max positions 0"},
		{"unknown cache dtype", func() error {
			_, err := NewRunnerWith(m, kernels.NewNative(), Options{MaxPositions: 8, CacheDType: 7})
			return err
		}, "cache dtype 7"},
		{"unknown attention path", func() error {
			_, err := NewRunnerWith(m, kernels.NewNative(), Options{MaxPositions: 8, MLAPath: 9})
			return err
		}, "attention path 9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("unexpected error %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
	if s := MLAPath(9).String(); s != "MLAPath(9)" {
		t.Errorf("String of an unknown path is %q", s)
	}
}

// One Runner serves sequences from several goroutines at once, each with
// its own cache, and each gets the logits it gets alone (run with -race).
func TestRunnerConcurrentSequences(t *testing.T) {
	ctx := context.Background()
	for name, m := range map[string]*model.Model{
		"gqa": randomModel(t, gqaConfig(0, true), 5),
		"mla": randomModel(t, mlaCases[2].config(), 6),
	} {
		t.Run(name, func(t *testing.T) {
			r, err := NewRunner(m, kernels.NewNative(), 64)
			if err != nil {
				t.Fatal(err)
			}
			const seqs = 4
			want := make([][]float32, seqs)
			for i := range want {
				if want[i], err = r.Forward(ctx, r.NewCache(), edgeTokens(20+i, 50), true); err != nil {
					t.Fatal(err)
				}
			}
			got := make([][]float32, seqs)
			errs := make([]error, seqs)
			var wg sync.WaitGroup
			for i := range seqs {
				wg.Go(func() {
					got[i], errs[i] = r.Forward(ctx, r.NewCache(), edgeTokens(20+i, 50), true)
				})
			}
			wg.Wait()
			for i := range seqs {
				if errs[i] != nil {
					t.Fatal(errs[i])
				}
				if e := maxRelErr(got[i], want[i]); e != 0 {
					t.Errorf("sequence %d: concurrent logits differ from the serial ones by %.3g", i, e)
				}
			}
		})
	}
}

// Greedy decoding needs a position for every token it runs through the
// model: the prompt and all new tokens but the last, which is only
// produced. A runner of exactly that many positions suffices, and gives
// the tokens of a longer one.
func TestGreedyUsesEveryPosition(t *testing.T) {
	ctx := context.Background()
	m := randomModel(t, gqaConfig(0, true), 7)
	prompt := edgeTokens(5, 50)
	long, err := NewRunner(m, kernels.NewNative(), 32)
	if err != nil {
		t.Fatal(err)
	}
	want, err := Greedy(ctx, long, prompt, GenerateOptions{MaxTokens: 4})
	if err != nil {
		t.Fatal(err)
	}
	exact, err := NewRunner(m, kernels.NewNative(), len(prompt)+4-1)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Greedy(ctx, exact, prompt, GenerateOptions{MaxTokens: 4})
	if err != nil {
		t.Fatalf("prompt %d + 4 new tokens on a runner of %d positions: %v", len(prompt), exact.MaxPositions(), err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("tokens %v, want %v", got, want)
	}
	if _, err := Greedy(ctx, exact, prompt, GenerateOptions{MaxTokens: 5}); err == nil || !strings.Contains(err.Error(), "exceed") {
		t.Errorf("one token too many: error %v, want one saying the positions are exceeded", err)
	}
	if _, err := Greedy(ctx, exact, prompt, GenerateOptions{MaxTokens: -1}); err == nil {
		t.Error("a negative token count was accepted")
	}
}

// Truncate rolls a cache back (a rejected speculative step) without giving
// up its pages, and CopyFrom forks it: either way the next tokens get the
// logits of a fresh cache that saw the same tokens.
func TestCacheTruncateAndCopy(t *testing.T) {
	ctx := context.Background()
	for name, m := range map[string]*model.Model{
		"gqa": randomModel(t, gqaConfig(0, true), 8),
		"mla": randomModel(t, mlaCases[1].config(), 9),
	} {
		t.Run(name, func(t *testing.T) {
			r, err := NewRunnerWith(m, kernels.NewNative(), Options{MaxPositions: 300, CacheDType: kernels.RowBF16})
			if err != nil {
				t.Fatal(err)
			}
			ids := edgeTokens(200, 50)
			alt := edgeTokens(70, 47) // another continuation after position 130
			fresh := func(tokens []int) []float32 {
				out, err := r.Forward(ctx, r.NewCache(), tokens, true)
				if err != nil {
					t.Fatal(err)
				}
				return out
			}
			V := m.Config.VocabSize
			want := fresh(append(append([]int{}, ids[:130]...), alt...))[130*V:]

			c := r.NewCache()
			if _, err := r.Forward(ctx, c, ids, false); err != nil {
				t.Fatal(err)
			}
			held := c.BytesAllocated()
			c.Truncate(130)
			if c.Len() != 130 || c.BytesAllocated() != held {
				t.Fatalf("after Truncate(130): %d positions, %d bytes (had %d)", c.Len(), c.BytesAllocated(), held)
			}
			fork := r.NewCache()
			if err := fork.CopyFrom(c); err != nil {
				t.Fatal(err)
			}
			for what, cache := range map[string]*KVCache{"truncated": c, "copied": fork} {
				got, err := r.Forward(ctx, cache, alt, true)
				if err != nil {
					t.Fatal(err)
				}
				if e := maxRelErr(got, want); e > 1e-5 {
					t.Errorf("%s cache: logits differ from a fresh one's by %.3g", what, e)
				}
			}
			c.Reset()
			if c.Len() != 0 || c.BytesAllocated() != held {
				t.Errorf("after Reset: %d positions, %d bytes (had %d)", c.Len(), c.BytesAllocated(), held)
			}
		})
	}
}
