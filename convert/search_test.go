package convert

import (
	"context"
	"encoding/json"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/synthtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

// Every setting a search tries is a valid conversion within its budget,
// leaves the latent at least a quarter of it, and the set holds what the
// measurements called for: the classic spread, slots packed on the fastest
// frequencies and two per frequency where neighbours are close; neither
// folding nor fractional strides where neighbouring frequencies are 10×
// apart (stories260K's head_dim 8).
func TestSearchSettings(t *testing.T) {
	llama := model.Config{HiddenSize: 768, NumHeads: 6, NumKVHeads: 2, HeadDim: 128, Rope: rope.Params{Dim: 128, Theta: 5e5}}
	stories := model.Config{HiddenSize: 64, NumHeads: 8, NumKVHeads: 4, HeadDim: 8, Rope: rope.Params{Dim: 8, Theta: 1e4}}
	base := DefaultOptions(llama, 0)
	base.RopeDim = 0 // searched
	for _, tc := range []struct {
		name   string
		cfg    model.Config
		budget int
		want   []Options // RopeDim, RopeStride, FreqFold that must be tried
		banned func(Options) bool
	}{
		{"llama 256", llama, 256, []Options{{RopeDim: 64, FreqFold: 4}, {RopeDim: 64, RopeStride: 1, FreqFold: 2}, {RopeDim: 128, RopeStride: 0.5, FreqFold: 1}}, nil},
		{"llama 128", llama, 128, []Options{{RopeDim: 64, RopeStride: 1, FreqFold: 2}}, func(o Options) bool { return o.RopeDim > 96 }},
		{"stories 32", stories, 32, []Options{{RopeDim: 8, FreqFold: 1}}, func(o Options) bool {
			unit := max(1, int(o.RopeStride))
			if o.RopeStride == 0 {
				unit = 8 / o.RopeDim
			}
			return o.FreqFold > unit || (o.RopeStride > 0 && o.RopeStride < 1)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := SearchSettings(tc.cfg, tc.budget, base)
			if len(got) == 0 {
				t.Fatal("no settings")
			}
			for _, o := range got {
				o.Rank = min(tc.budget-o.RopeDim, LosslessRank(tc.cfg, o.RopeDim))
				if err := o.Validate(tc.cfg); err != nil {
					t.Errorf("%+v: %v", o, err)
				}
				if o.Rank < tc.budget/4 || o.Rank+o.RopeDim > tc.budget {
					t.Errorf("d_c %d + d_r %d for a budget of %d", o.Rank, o.RopeDim, tc.budget)
				}
				if tc.banned != nil && tc.banned(o) {
					t.Errorf("tried d_r %d stride %v freqfold %d", o.RopeDim, o.RopeStride, o.FreqFold)
				}
				if o.Weighting != base.Weighting || o.RopeRank != base.RopeRank {
					t.Errorf("%+v: the base's weighting and ranking were not kept", o)
				}
			}
			for _, w := range tc.want {
				found := false
				for _, o := range got {
					found = found || (o.RopeDim == w.RopeDim && o.RopeStride == w.RopeStride && o.FreqFold == w.FreqFold)
				}
				if !found {
					t.Errorf("d_r %d stride %v freqfold %d not tried", w.RopeDim, w.RopeStride, w.FreqFold)
				}
			}
		})
	}
}

// A search scores every candidate on the held-out tokens, picks the
// finalist of lowest perplexity (and the best of each requested d_r),
// and what it writes is what it scored: eval of the written checkpoint on
// the held-out tokens gives the candidate's perplexity.
func TestSearchPicksAndWritesTheBest(t *testing.T) {
	if testing.Short() {
		t.Skip("converts and scores a dozen candidates (-short)")
	}
	src := synthtest.Checkpoint(t, model.DefaultSynthetic())
	be := kernels.NewNative()
	job := SearchJob{
		Source: src, Budgets: []int{48, 96}, Base: DefaultOptions(model.Config{}, 0), RopeDims: []int{16},
		Calibration: &Calibration{File: calibText(t), Tokens: 1024, SeqLen: 64, Seed: 1},
		Windows:     3, Ctx: 64, Backend: be, Version: "test",
	}
	job.Base.RopeDim = 0
	res, err := Search(context.Background(), job)
	if err != nil {
		t.Fatal(err)
	}
	if res.HeldOutTokens != 3*64 || len(res.Budgets) != 2 {
		t.Fatalf("%d held-out tokens, %d budgets", res.HeldOutTokens, len(res.Budgets))
	}
	for _, b := range res.Budgets {
		best := b.Best()
		finalists := 0
		for _, c := range b.Candidates {
			if c.Rank+c.RopeDim > b.Cache || !(c.Screen > 0) {
				t.Errorf("budget %d: candidate %+v", b.Cache, c)
			}
			if c.PPL > 0 {
				finalists++
				if c.PPL < best.PPL && !c.extra {
					t.Errorf("budget %d: finalist %+v beats the chosen %+v", b.Cache, c, best)
				}
			}
		}
		if finalists < 2 || !best.Best {
			t.Errorf("budget %d: %d finalists, best %+v", b.Cache, finalists, best)
		}
		if c, ok := b.BestWith(16); !ok || c.RopeDim != 16 || c.PPL == 0 {
			t.Errorf("budget %d: best with d_r 16 is %+v (%v)", b.Cache, c, ok)
		}
		out := filepath.Join(t.TempDir(), "best")
		if _, err := res.Write(context.Background(), best, out, false, nil, nil); err != nil {
			t.Fatal(err)
		}
		m, err := model.Load(context.Background(), out, nil)
		if err != nil {
			t.Fatal(err)
		}
		r, err := eval.NewRunner(m, be, 64)
		if err != nil {
			t.Fatal(err)
		}
		pr, err := eval.Perplexity(context.Background(), r, res.Plan().HeldOut(), eval.PerplexityOptions{Ctx: 64})
		if err != nil {
			t.Fatal(err)
		}
		if math.Abs(pr.PPL-best.PPL) > 1e-6*best.PPL {
			t.Errorf("budget %d: the written checkpoint scores %v on the held-out tokens, the search %v", b.Cache, pr.PPL, best.PPL)
		}
	}
}

// smallSearch is a search of the synthetic checkpoint at budget on 512
// calibration tokens, scored on 2 held-out windows of 64, d_r searched.
func smallSearch(t *testing.T, budget int) SearchJob {
	job := SearchJob{
		Source: synthtest.Checkpoint(t, model.DefaultSynthetic()), Budgets: []int{budget}, Base: DefaultOptions(model.Config{}, 0),
		Calibration: &Calibration{File: calibText(t), Tokens: 512, SeqLen: 64, Seed: 1},
		Windows:     2, Ctx: 64, Backend: kernels.NewNative(), Version: "test",
	}
	job.Base.RopeDim = 0
	return job
}

// The candidates that only a fixed-d_r series brings in (here d_r 32,
// whose latent would get less than a quarter of the budget) never become
// the budget's best: with or without the series, the search chooses what
// convert --cache chooses.
func TestSearchBestIgnoresSeriesCandidates(t *testing.T) {
	if testing.Short() {
		t.Skip("converts and scores candidates (-short)")
	}
	job := smallSearch(t, 40)
	plain, err := Search(context.Background(), job)
	if err != nil {
		t.Fatal(err)
	}
	job.RopeDims = []int{32}
	series, err := Search(context.Background(), job)
	if err != nil {
		t.Fatal(err)
	}
	b := series.Budgets[0]
	extras := 0
	for _, c := range b.Candidates {
		if c.extra {
			extras++
			if c.RopeDim != 32 || c.Best {
				t.Errorf("series candidate %+v", c)
			}
		}
	}
	if extras == 0 {
		t.Fatal("the d_r 32 series added no candidates: the test shows nothing")
	}
	want, got := plain.Budgets[0].Best(), b.Best()
	want.method, got.method = 0, 0
	if got != want {
		t.Errorf("best with the series %+v, without %+v", got, want)
	}
	if c, ok := b.BestWith(32); !ok || c.RopeDim != 32 {
		t.Errorf("best with d_r 32: %+v (%v)", c, ok)
	}
}

func TestSearchKeepsToTheTarget(t *testing.T) {
	if testing.Short() {
		t.Skip("converts and scores candidates (-short)")
	}
	job := smallSearch(t, 96)
	// vLLM's CPU ordinary-attention backend takes head sizes 32, 64, 80,
	// ...: with head_dim 32 only d_r 32 (and 64) make qk_nope + d_r one.
	job.Base.Target = "vllm-cpu-mha"
	tgt, _ := LookupTarget(job.Base.Target)
	res, err := Search(context.Background(), job)
	if err != nil {
		t.Fatal(err)
	}
	cands := res.Budgets[0].Candidates
	if len(cands) == 0 {
		t.Fatal("no candidates")
	}
	for _, c := range cands {
		if !slices.Contains(tgt.HeadDims, 32+c.RopeDim) {
			t.Errorf("candidate %+v: head size %d is not one vllm-cpu-mha takes", c, 32+c.RopeDim)
		}
	}

	// vllm-cpu takes d_r 64 only, more than a budget of 48 holds.
	job.Budgets, job.Base.Target = []int{48}, "vllm-cpu"
	if _, err := Search(context.Background(), job); err == nil || !strings.Contains(err.Error(), "--target vllm-cpu") {
		t.Errorf("budget 48 for vllm-cpu: err %v, want one naming the target", err)
	}
}

// The chosen candidate is found from its mark, so a result read back from
// search.json (sweep's) names the same one.
func TestBestSurvivesJSON(t *testing.T) {
	in := BudgetResult{Cache: 96, Candidates: []Candidate{
		{Rank: 64, RopeDim: 32, Screen: 9, PPL: 8},
		{Rank: 80, RopeDim: 16, Screen: 8, PPL: 7, Best: true},
	}}
	data, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var out BudgetResult
	if err := json.Unmarshal(data, &out); err != nil {
		t.Fatal(err)
	}
	if got := out.Best(); got != in.Candidates[1] {
		t.Errorf("best after a JSON round trip is %+v, want %+v", got, in.Candidates[1])
	}
}
