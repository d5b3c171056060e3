package convert

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/tokenizer"
)

// SearchJob asks for the best conversion of a source at each of several
// KV-cache budgets: how the budget is split between the decoupled RoPE
// key (d_r) and the latent (d_c), and the RoPE stage's settings, chosen
// by perplexity on held-out calibration text.
type SearchJob struct {
	// Source is the GQA checkpoint directory; it is only read.
	Source string
	// Budgets are KV-cache values per token and layer, d_c + d_r each.
	Budgets []int
	// Base holds the choices the search keeps (weighting, value weight,
	// format). A positive RopeDim fixes d_r; RopeMethod must be RoRoPE.
	Base Options
	// RopeDims, when set, adds candidates at these d_r and finds the best
	// at each of them as well (BudgetResult.BestWith): sweep's series.
	RopeDims []int
	// DType is the stored dtype of the converted models, as in Job.
	DType string
	// Calibration is required; its HoldOut is set by the search.
	Calibration *Calibration
	// Windows and Ctx size the held-out text: Windows windows of Ctx
	// tokens. 0 picks DefaultSearchWindows of min(1024, the model's
	// max_position_embeddings) tokens, fewer and shorter (down to 2 of 64)
	// where that would take more than a quarter of the calibration text.
	Windows, Ctx int
	// Backend computes calibration and scoring.
	Backend kernels.Backend
	// Version is the tool version recorded in written checkpoints.
	Version string
	// Progress, when not nil, is told of the calibration's layers
	// (as NewPlan's) and of each candidate scored (StageScore).
	Progress func(Event)
}

// BudgetError says that no candidate conversion fits a budget: a request
// that cannot be met, not a failure of the search.
type BudgetError struct {
	// Cache is the budget, values per token and layer.
	Cache int
	// Why completes "no split of the cache ...".
	Why string
}

func (e *BudgetError) Error() string {
	return fmt.Sprintf("search: no split of a cache of %d values per token and layer %s", e.Cache, e.Why)
}

// StageScore is the progress stage of a search scoring its candidates:
// Layer counts the candidates scored, of Layers.
const StageScore = "score"

// DefaultSearchWindows is how many held-out windows the finalists of a
// search are scored on; every candidate is first scored on the first
// searchFirstWindows of them.
const DefaultSearchWindows = 8

const (
	searchFirstWindows = 2
	searchFinalists    = 3
)

// Candidate is one conversion a search scored.
type Candidate struct {
	// Rank and RopeDim are d_c and d_r.
	Rank    int `json:"kv_lora_rank"`
	RopeDim int `json:"qk_rope_head_dim"`
	// RopeStride and FreqFold are the RoPE stage's settings.
	RopeStride float64 `json:"rope_stride"`
	FreqFold   int     `json:"freqfold"`
	// Screen is the perplexity on the first held-out windows, which every
	// candidate is scored on; PPL, on all of them, for the finalists (0
	// for the others).
	Screen float64 `json:"screen_ppl"`
	PPL    float64 `json:"held_out_ppl,omitempty"`
	// Best marks the candidate chosen for its budget, BestForRopeDim the
	// best of its d_r (of SearchJob.RopeDims).
	Best           bool `json:"best,omitempty"`
	BestForRopeDim bool `json:"best_for_rope_dim,omitempty"`

	method int  // index of its settings in the plan
	extra  bool // only in a RopeDims series (see Search)
}

// BudgetResult is a search's outcome at one budget.
type BudgetResult struct {
	// Cache is the budget, values per token and layer.
	Cache int `json:"cache_values_per_token_layer"`
	// Candidates are every conversion scored, the best marked.
	Candidates []Candidate `json:"candidates"`
}

// Best is the chosen candidate, the one marked Best (also in a result
// read back from JSON).
func (b BudgetResult) Best() Candidate {
	for _, c := range b.Candidates {
		if c.Best {
			return c
		}
	}
	return Candidate{}
}

// BestWith is the best candidate with d_r = ropeDim, one of
// SearchJob.RopeDims; false when none fits the budget.
func (b BudgetResult) BestWith(ropeDim int) (Candidate, bool) {
	for _, c := range b.Candidates {
		if c.BestForRopeDim && c.RopeDim == ropeDim {
			return c, true
		}
	}
	return Candidate{}, false
}

// SearchResult is a finished search: its results per budget and the plan
// that builds (or writes) any candidate.
type SearchResult struct {
	Budgets []BudgetResult `json:"budgets"`
	// Seconds are the wall times of the calibration with every
	// candidate's analysis, and of the scoring.
	PlanSeconds  float64 `json:"plan_seconds"`
	ScoreSeconds float64 `json:"score_seconds"`
	// HeldOutTokens counts the held-out calibration tokens, in windows of
	// Ctx; every candidate is screened on the first ScreenWindows.
	HeldOutTokens int `json:"held_out_tokens"`
	Ctx           int `json:"held_out_ctx"`
	ScreenWindows int `json:"screen_windows"`
	plan          *Plan
	settings      []Options
}

// Plan is the plan the candidates were analysed in.
func (r *SearchResult) Plan() *Plan { return r.plan }

// Options are the conversion options of candidate c.
func (r *SearchResult) Options(c Candidate) Options {
	o := r.settings[c.method]
	o.Rank = c.Rank
	return o
}

// Model builds candidate c in memory, as Plan.Model does.
func (r *SearchResult) Model(c Candidate) (*model.Model, []LayerReport, error) {
	return r.plan.Model(c.method, c.Rank)
}

// Write writes candidate c's checkpoint to dir, as convert writes it,
// telling progress (when not nil) of each layer written.
func (r *SearchResult) Write(ctx context.Context, c Candidate, dir string, force bool, refine *Refine, progress func(Event)) (*Summary, error) {
	return r.plan.Write(ctx, c.method, c.Rank, dir, force, refine, progress)
}

// Search calibrates job.Source once, analyses every candidate RoPE setting
// once (each factorization at the largest width its budgets need), and
// for each budget scores every candidate on the first held-out windows,
// then the best few on all of them, and keeps the lowest perplexity.
func Search(ctx context.Context, job SearchJob) (*SearchResult, error) {
	if job.Calibration == nil {
		return nil, fmt.Errorf("search: the search scores candidates on held-out calibration text; give a calibration file")
	}
	if len(job.Budgets) == 0 {
		return nil, fmt.Errorf("search: no cache budgets")
	}
	cfg, err := model.LoadConfig(filepath.Join(job.Source, "config.json"))
	if err != nil {
		return nil, err
	}
	if cfg.MLA != nil {
		return nil, fmt.Errorf("the model is already MLA (%s); convert reads GQA models (%v)", cfg.Architecture, gqaArchitectures())
	}
	windows, ctxLen, err := heldOutWindows(job, cfg)
	if err != nil {
		return nil, err
	}
	// extra marks the candidates only a RopeDims series asked for:
	// the budget's best is chosen without them, as convert --cache
	// chooses it.
	type shape struct {
		settings, rank int
		extra          bool
	}
	var settings []Options
	perBudget := make([][]shape, len(job.Budgets))
	for bi, n := range job.Budgets {
		cands := SearchSettings(cfg, n, job.Base)
		searched := len(cands)
		refusal := ""
		for _, dr := range job.RopeDims {
			b := job.Base
			b.RopeDim = dr
			for _, o := range SearchSettings(cfg, n, b) {
				if !slices.ContainsFunc(cands, func(s Options) bool { return s == o }) {
					cands = append(cands, o)
				}
			}
		}
		for ci, o := range cands {
			dc := min(n-o.RopeDim, LosslessRank(cfg, o.RopeDim))
			shaped := o
			shaped.Rank = dc
			if err := shaped.validateTarget(cfg); err != nil {
				refusal = cmp.Or(refusal, err.Error())
				continue // a shape Base.Target (or Base.PadLatent) cannot take
			}
			i := slices.IndexFunc(settings, func(s Options) bool { return sameRoPE(s, o) })
			if i < 0 {
				i = len(settings)
				settings = append(settings, o)
			}
			settings[i].Rank = max(settings[i].Rank, dc)
			perBudget[bi] = append(perBudget[bi], shape{i, dc, ci >= searched})
		}
		if len(perBudget[bi]) == 0 {
			why := fmt.Sprintf("fits (the latent needs at least max(%d, a quarter of the budget) values, and the RoPE key at least a quarter of head_dim %d)", minSearchRank, cfg.HeadDim)
			if t, ok := LookupTarget(job.Base.Target); ok {
				why = fmt.Sprintf("makes a shape that --target %s (%s) loads: %s", t.Name, t.Engine, t.shapes())
			}
			if refusal != "" {
				why += "; the first split tried was refused: " + refusal
			}
			return nil, &BudgetError{Cache: n, Why: why}
		}
	}

	cal := *job.Calibration
	cal.HoldOut = windows * ctxLen
	start := time.Now()
	plan, err := NewPlan(ctx, PlanJob{
		Source: job.Source, Methods: settings, DType: job.DType, Calibration: &cal,
		Backend: job.Backend, Version: job.Version, Progress: job.Progress, NoSpectra: true,
	})
	if err != nil {
		return nil, err
	}
	res := &SearchResult{plan: plan, settings: settings, PlanSeconds: time.Since(start).Seconds(),
		HeldOutTokens: len(plan.HeldOut()), Ctx: ctxLen, ScreenWindows: min(searchFirstWindows, windows)}
	start = time.Now()
	be := job.Backend
	if be == nil {
		be = kernels.Gonum{}
	}
	// The finalists are known only after screening: the total counts at
	// most searchFinalists per series, and the count skips what was not
	// needed.
	total := 0
	estimate := make([]int, len(perBudget))
	for bi, s := range perBudget {
		total += len(s)
		if windows > searchFirstWindows {
			estimate[bi] = min(searchFinalists, len(s)) * (1 + len(job.RopeDims))
			total += estimate[bi]
		}
	}
	done := 0
	score := func(c *Candidate, n int) (float64, error) {
		m, _, err := plan.Model(c.method, c.Rank)
		if err != nil {
			return 0, err
		}
		r, err := eval.NewRunner(m, be, ctxLen)
		if err != nil {
			return 0, err
		}
		pr, err := eval.Perplexity(ctx, r, plan.HeldOut(), eval.PerplexityOptions{Ctx: ctxLen, MaxWindows: n})
		if err != nil {
			return 0, fmt.Errorf("score d_c %d + d_r %d: %w", c.Rank, c.RopeDim, err)
		}
		if math.IsNaN(pr.PPL) || math.IsInf(pr.PPL, 0) {
			// No order ranks it, and JSON cannot hold it.
			return 0, fmt.Errorf("score d_c %d + d_r %d: held-out perplexity %v", c.Rank, c.RopeDim, pr.PPL)
		}
		done++
		if job.Progress != nil {
			job.Progress(Event{Stage: StageScore, Layer: done, Layers: total})
		}
		return pr.PPL, nil
	}
	for bi, shapes := range perBudget {
		br := BudgetResult{Cache: job.Budgets[bi]}
		for _, s := range shapes {
			o := settings[s.settings]
			c := Candidate{Rank: s.rank, RopeDim: o.RopeDim, RopeStride: o.RopeStride, FreqFold: o.FreqFold, method: s.settings, extra: s.extra}
			if c.RopeStride == 0 {
				c.RopeStride = float64(cfg.HeadDim / o.RopeDim)
			}
			if c.Screen, err = score(&c, min(searchFirstWindows, windows)); err != nil {
				return nil, err
			}
			br.Candidates = append(br.Candidates, c)
		}
		// The finalists are scored again on every held-out window; the
		// best of them is chosen.
		order := make([]int, len(br.Candidates))
		for i := range order {
			order[i] = i
		}
		sort.SliceStable(order, func(a, b int) bool { return br.Candidates[order[a]].Screen < br.Candidates[order[b]].Screen })
		var finalists []int
		for _, i := range order {
			if !br.Candidates[i].extra && len(finalists) < searchFinalists {
				finalists = append(finalists, i)
			}
		}
		chosen := len(finalists) // finalists[:chosen] compete for Best
		group := func(dr int) []int {
			var g []int
			for _, i := range order {
				if br.Candidates[i].RopeDim == dr && len(g) < searchFinalists {
					g = append(g, i)
				}
			}
			return g
		}
		for _, dr := range job.RopeDims {
			for _, i := range group(dr) {
				if !slices.Contains(finalists, i) {
					finalists = append(finalists, i)
				}
			}
		}
		for _, i := range finalists {
			c := &br.Candidates[i]
			c.PPL = c.Screen
			if windows > searchFirstWindows {
				if c.PPL, err = score(c, windows); err != nil {
					return nil, err
				}
			}
		}
		if windows > searchFirstWindows {
			done += estimate[bi] - len(finalists) // the total counted the estimate
		}
		if chosen > 0 {
			best := finalists[0]
			for _, i := range finalists[:chosen] {
				if br.Candidates[i].PPL < br.Candidates[best].PPL {
					best = i
				}
			}
			br.Candidates[best].Best = true
		}
		for _, dr := range job.RopeDims {
			if g := group(dr); len(g) > 0 {
				b := g[0]
				for _, i := range g {
					if br.Candidates[i].PPL < br.Candidates[b].PPL {
						b = i
					}
				}
				br.Candidates[b].BestForRopeDim = true
			}
		}
		res.Budgets = append(res.Budgets, br)
	}
	res.ScoreSeconds = time.Since(start).Seconds()
	return res, nil
}

// heldOutWindows sizes the held-out text of job (see SearchJob.Windows).
func heldOutWindows(job SearchJob, cfg model.Config) (windows, ctxLen int, err error) {
	windows, ctxLen = job.Windows, job.Ctx
	if ctxLen != 0 && ctxLen < 2 || windows < 0 {
		return 0, 0, fmt.Errorf("search: %d held-out windows of %d tokens", windows, ctxLen)
	}
	if windows > 0 && ctxLen > 0 {
		return windows, ctxLen, nil
	}
	text, err := os.ReadFile(job.Calibration.File)
	if err != nil {
		return 0, 0, fmt.Errorf("calibration file: %w", err)
	}
	tok, err := tokenizer.Load(filepath.Join(job.Source, "tokenizer.json"))
	if err != nil {
		return 0, 0, fmt.Errorf("calibration needs the source's tokenizer: %w", err)
	}
	tokens := len(tok.Encode(string(text), true))
	quarter := tokens / 4
	if windows == 0 {
		windows = DefaultSearchWindows
	}
	if ctxLen == 0 {
		ctxLen = 1024
		if m := cfg.MaxPositionEmbeddings; m > 0 {
			ctxLen = min(ctxLen, m)
		}
	}
	for windows*ctxLen > quarter && windows > 2 && job.Windows == 0 {
		windows--
	}
	for windows*ctxLen > quarter && ctxLen > 64 && job.Ctx == 0 {
		ctxLen /= 2
	}
	if windows*ctxLen > quarter {
		return 0, 0, fmt.Errorf("calibration file %s: %d tokens, too short to hold out %d windows of %d for the search (a quarter at most); use a longer file", job.Calibration.File, tokens, windows, ctxLen)
	}
	return windows, ctxLen, nil
}

// minSearchRank is the narrowest latent a search tries.
const minSearchRank = 8

// sameRoPE reports whether two options share their analysis: everything
// but the latent width.
func sameRoPE(a, b Options) bool {
	a.Rank, b.Rank = 0, 0
	return a == b
}

// SearchSettings lists the RoPE settings a search tries at a cache of
// budget values per token and layer (RopeDim, RopeStride, FreqFold set on
// base; Rank is left to the caller): d_r from a quarter to twice head_dim
// (or base.RopeDim when set) with at least a quarter of the budget, and
// minSearchRank, left to the latent; slots spread over all frequencies
// (the classic stride head_dim/d_r) or packed on the fastest, one to
// n_kv per frequency, covering at least half of them (below that the
// measured candidates were never close); FreqFold one
// stride or two, the latter only where neighbouring frequencies are
// within a factor 2 (folding frequencies further apart wrecks the keys).
func SearchSettings(cfg model.Config, budget int, base Options) []Options {
	d, G := cfg.HeadDim, cfg.NumKVHeads
	dims := []int{base.RopeDim}
	if base.RopeDim <= 0 {
		dims = nil
		for _, f := range []int{1, 2, 3, 4, 6, 8} { // quarters of head_dim
			if dr := f * d / 4; dr%2 == 0 && dr > 0 && (f*d)%4 == 0 {
				dims = append(dims, dr)
			}
		}
	}
	neighbours := math.Pow(cfg.Rope.Theta, 2/float64(d))
	var out []Options
	for _, dr := range dims {
		dc := min(budget-dr, LosslessRank(cfg, dr))
		if dc < max(minSearchRank, budget/4) && !(base.RopeDim > 0 && dc >= minSearchRank) {
			continue
		}
		var strides []float64
		if d%dr == 0 {
			strides = append(strides, float64(d/dr))
		}
		// Fractional strides put slots between neighbouring frequencies:
		// only where those are close (within 4×: a slot then rotates
		// within 2× of its component's frequency).
		for k := 1; k <= G && (k == 1 || neighbours <= 4); k *= 2 {
			strides = append(strides, 1/float64(k))
		}
		seen := map[float64]bool{}
		for _, s := range strides {
			cover := float64(dr/2) * s
			if seen[s] || rope.CheckSlots(d, dr, s) != nil || cover < float64(d/4) {
				continue
			}
			seen[s] = true
			unit := max(1, int(s))
			for _, fold := range []int{unit, 2 * unit} {
				if (d/2)%fold != 0 || (fold > unit && math.Pow(neighbours, float64(fold-1)) > 2) {
					continue
				}
				o := base
				o.RopeDim, o.RopeStride, o.FreqFold, o.RopeMethod = dr, s, fold, rope.MethodRoRoPE
				if s == float64(d/dr) && d%dr == 0 {
					o.RopeStride = 0 // the classic spread: rope_theta stays the source's
				}
				out = append(out, o)
			}
		}
	}
	return out
}
