package sweep

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/transmla/transmla/convert"
	"github.com/transmla/transmla/model"
)

// seriesSpec is one series of a budget sweep: the best conversion at each
// budget, or the best with a fixed d_r.
type seriesSpec struct {
	name    string
	ropeDim int // 0: any
}

// bestSeries names the series of the best conversion at each budget.
const bestSeries = "best"

func (c *Config) series() []seriesSpec {
	s := []seriesSpec{{name: bestSeries}}
	for _, d := range c.RopeDims {
		s = append(s, seriesSpec{name: fmt.Sprintf("dr%d", d), ropeDim: d})
	}
	return s
}

func budgetPointPath(dir, series string, budget int) string {
	return filepath.Join(dir, "points", fmt.Sprintf("%s-cache%d.json", series, budget))
}

func budgetCheckpointPath(dir, series string, budget int) string {
	return filepath.Join(dir, "checkpoints", fmt.Sprintf("%s-cache%d", series, budget))
}

// searchJSON is the file, in Dir, of the last search's candidates.
const searchJSON = "search.json"

// budgetTask is one point of a budget sweep.
type budgetTask struct {
	series seriesSpec
	budget int
	eval   bool
}

// resumeBudgets computes the points of a budget sweep that Dir/points
// lacks: one search (calibration, every candidate analysed once and
// scored on held-out calibration text) serves them all.
func (c *Config) resumeBudgets(ctx context.Context, setup Setup, st *state) (*Results, error) {
	_, haveOriginal := st.points[pointPath(c.Dir, originalName, 0)]
	evalOriginal := c.Force || !haveOriginal
	var tasks []budgetTask
	for _, s := range c.series() {
		for _, b := range c.Budgets {
			if work, eval := c.pending(st, budgetPointPath(c.Dir, s.name, b), budgetCheckpointPath(c.Dir, s.name, b)); work {
				tasks = append(tasks, budgetTask{series: s, budget: b, eval: eval})
			}
		}
	}
	r := &runner{c: c, setup: setup, st: st, steps: len(tasks)}
	if evalOriginal {
		r.steps++
	}
	if len(tasks) > 0 {
		r.steps++ // the search
	}
	var err error
	if evalOriginal || len(tasks) > 0 {
		if r.ids, err = r.tokenize(); err != nil {
			return nil, err
		}
	}
	if err := r.runBudgets(ctx, evalOriginal, tasks); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("interrupted; the finished points are kept in %s and running the same command again resumes: %w", c.Dir, err)
		}
		return nil, err
	}
	return r.rebuild()
}

func (r *runner) runBudgets(ctx context.Context, evalOriginal bool, tasks []budgetTask) error {
	var search *convert.SearchResult
	if len(tasks) > 0 {
		var err error
		if search, err = r.search(ctx); err != nil {
			return err
		}
	}
	if evalOriginal {
		if err := r.original(ctx); err != nil {
			return err
		}
	}
	for _, t := range tasks {
		if err := r.budgetPoint(ctx, search, t); err != nil {
			return err
		}
	}
	return nil
}

// search runs convert's search at every budget and saves its candidates.
func (r *runner) search(ctx context.Context) (*convert.SearchResult, error) {
	r.step++
	job := convert.SearchJob{
		Source: r.c.Model, Budgets: r.c.Budgets, Base: r.c.Methods[0].Options, RopeDims: r.c.RopeDims,
		DType: r.c.DType, Calibration: r.c.Calibration, Backend: r.c.Backend, Version: r.c.Version, Ctx: r.c.SearchCtx,
	}
	job.Base.RopeDim = 0
	job.Progress = func(ev convert.Event) {
		what := "calibrate and analyse"
		if ev.Stage == convert.StageScore {
			what = "score candidates on held-out calibration text"
		}
		r.progress(what, ev.Layer, ev.Layers, nil)
	}
	res, err := convert.Search(ctx, job)
	if err != nil {
		return nil, fmt.Errorf("convert %s: %w", r.c.Model, err)
	}
	if err := writeJSONFile(filepath.Join(r.c.Dir, searchJSON), res); err != nil {
		return nil, err
	}
	return res, nil
}

// budgetPoint evaluates (and writes, when asked) the chosen conversion of
// one series at one budget.
func (r *runner) budgetPoint(ctx context.Context, search *convert.SearchResult, t budgetTask) error {
	r.step++
	var b convert.BudgetResult
	for _, br := range search.Budgets {
		if br.Cache == t.budget {
			b = br
		}
	}
	cand := b.Best()
	ok := cand.Best // none when only other series' shapes fit
	if t.series.ropeDim > 0 {
		cand, ok = b.BestWith(t.series.ropeDim)
	}
	what := fmt.Sprintf("%s cache %d", t.series.name, t.budget)
	if !ok {
		// Nothing of that d_r fits the budget: no point, and nothing saved.
		r.progress(what+": no candidate fits", 1, 1, nil)
		return nil
	}
	if m, ok := r.measured[cand]; t.eval && ok {
		// Another series chose this very conversion: same figures.
		p := m.p
		p.Method = t.series.name
		if err := r.save(budgetPointPath(r.c.Dir, t.series.name, t.budget), p, m.res); err != nil {
			return err
		}
	} else if t.eval {
		r.progress("build "+what, 0, 1, nil)
		start := time.Now()
		cm, reports, err := r.build(ctx, func(dir string) (*convert.Summary, error) {
			return search.Write(ctx, cand, dir, true, r.c.Refine, nil)
		}, func() (*model.Model, []convert.LayerReport, error) { return search.Model(cand) })
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		built := time.Since(start).Seconds()
		start = time.Now()
		res, err := r.perplexity(ctx, cm, "eval "+what)
		if err != nil {
			return fmt.Errorf("eval %s: %w", what, err)
		}
		k := r.c.keys()[t.series.name]
		p := Point{Method: t.series.name, MethodDetail: k.detail, Chosen: search.Options(cand).Method(true), Format: k.format, RopeDim: cand.RopeDim, DC: cand.Rank,
			CacheValuesPerToken: cm.Config.KVCacheValuesPerToken(), CacheBytesPerToken: cm.KVCacheBytesPerToken(),
			Cache: t.budget, RopeStride: cand.RopeStride, FreqFold: cand.FreqFold, HeldOutPPL: cand.PPL,
			ConvertSeconds: built, EvalSeconds: time.Since(start).Seconds()}
		for _, rep := range reports {
			p.Retained += rep.Retained / float64(len(reports))
		}
		if err := r.save(budgetPointPath(r.c.Dir, t.series.name, t.budget), p, res); err != nil {
			return err
		}
		if r.measured == nil {
			r.measured = map[convert.Candidate]measuredPoint{}
		}
		r.measured[cand] = measuredPoint{p, res}
	}
	if r.c.KeepCheckpoints {
		r.progress("write "+what, 0, 1, nil)
		if err := os.MkdirAll(filepath.Join(r.c.Dir, "checkpoints"), 0o755); err != nil {
			return err
		}
		if _, err := search.Write(ctx, cand, budgetCheckpointPath(r.c.Dir, t.series.name, t.budget), true, r.c.Refine, nil); err != nil {
			return fmt.Errorf("write %s: %w", what, err)
		}
	}
	return nil
}
