// Package sweep measures what each latent width d_c costs in quality: it
// converts a GQA checkpoint at many widths (calibrating once and
// factoring each layer once, see convert.Plan), evaluates the original
// and every point on the same windows, and writes the results as CSV,
// JSON, a markdown table and plots. Each point is saved as it completes,
// so an interrupted sweep resumes where it stopped.
package sweep

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/transmla/transmla/convert"
	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/atomicfile"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/tokenizer"
)

// Method is one conversion method of a sweep.
type Method struct {
	// Name labels the method's series and files: letters, digits and
	// "+._-" only.
	Name string
	// Options are the conversion options; Rank is set per point.
	Options convert.Options
}

// Config describes a sweep.
type Config struct {
	// Model is the GQA checkpoint directory; it is only read.
	Model string
	// Ranks are the latent widths d_c to measure.
	Ranks []int
	// Budgets, instead of Ranks, are KV-cache sizes in values per token
	// and layer (d_c + d_r): at each, the split and RoPE settings are
	// searched as convert --cache searches them (on held-out calibration
	// text) and the best is measured, series "best"; with RopeDims, also
	// the best at each of those d_r, series "drN". Methods then holds one
	// method, the search's base options, and Calibration is required.
	Budgets  []int
	RopeDims []int
	// SearchCtx is the length of the held-out windows a budget sweep
	// scores its candidates on (0: convert's default).
	SearchCtx int
	// Methods are the conversion methods, one series each.
	Methods []Method
	// DType is the stored dtype of the converted models ("" for the
	// source's), as convert --dtype.
	DType string
	// Calibration is nil for data-free conversions.
	Calibration *convert.Calibration
	// Data is the evaluation text; Ctx and MaxWindows (0 = all) set the
	// windows, as eval's flags.
	Data       string
	Ctx        int
	MaxWindows int
	// Dir receives the results; it is created if needed.
	Dir string
	// Force recomputes every requested point and discards results of
	// other settings found in Dir.
	Force bool
	// KeepCheckpoints also writes each point's converted checkpoint to
	// Dir/checkpoints/METHOD-dcN.
	KeepCheckpoints bool
	// Backend computes calibration and evaluation.
	Backend kernels.Backend
	// Version is the tool version recorded with the results.
	Version string
	// Refine, when not nil, refines every conversion (convert --refine)
	// before it is evaluated; it needs Calibration.
	Refine *convert.Refine
	// Progress, when not nil, is told of each step's progress.
	Progress func(Event)
}

// Event reports progress.
type Event struct {
	// Step is the sweep step (1-based) of Steps: the shared calibration
	// and factorization, the original's evaluation, each point.
	Step, Steps int
	// What names the step, e.g. "eval rorope+attention dc 128".
	What string
	// Done of Total is the progress within the step (layers or windows).
	Done, Total int
	// Finished is set, with Done = Total, when a point's result is saved.
	Finished *Row
}

// Setup is what a result depends on besides its method and width; points
// computed with another setup are not mixed with the current ones.
type Setup struct {
	// Model is the source directory; ModelConfigSHA256 and ModelBytes (the
	// size of its safetensors files) identify its content.
	Model             string `json:"model"`
	ModelConfigSHA256 string `json:"model_config_sha256"`
	ModelBytes        int64  `json:"model_bytes"`
	// DType is the stored dtype of the converted models.
	DType string `json:"dtype"`
	// Calibration is nil for data-free conversions.
	Calibration *CalibrationSetup `json:"calibration"`
	// Data is the evaluation text, DataSHA256 its content.
	Data       string `json:"data"`
	DataSHA256 string `json:"data_sha256"`
	Ctx        int    `json:"ctx"`
	MaxWindows int    `json:"max_windows"`
	// Refine is the refinement of every conversion, nil for none.
	Refine *convert.Refine `json:"refine,omitempty"`
}

// CalibrationSetup is the calibration a setup uses.
type CalibrationSetup struct {
	File   string `json:"file"`
	SHA256 string `json:"sha256"`
	Tokens int    `json:"tokens"`
	SeqLen int    `json:"seq_len"`
	Seed   uint64 `json:"seed"`
}

// differs names the first difference that makes results of setup o
// unusable with s, or returns "". Paths may differ: contents count.
func (s Setup) differs(o Setup) string {
	var c, oc CalibrationSetup
	if s.Calibration != nil {
		c = *s.Calibration
	}
	if o.Calibration != nil {
		oc = *o.Calibration
	}
	c.File, oc.File = "", ""
	for _, d := range []struct {
		what     string
		now, was any
	}{
		{"model content (config.json sha256, weight bytes)", [2]any{s.ModelConfigSHA256, s.ModelBytes}, [2]any{o.ModelConfigSHA256, o.ModelBytes}},
		{"dtype", s.DType, o.DType},
		{"calibration (sha256, tokens, seq len, seed)", c, oc},
		{"data sha256", s.DataSHA256, o.DataSHA256},
		{"ctx", s.Ctx, o.Ctx},
		{"max windows", s.MaxWindows, o.MaxWindows},
		{"refinement", refineKey(s.Refine), refineKey(o.Refine)},
	} {
		if d.now != d.was {
			return fmt.Sprintf("%s: %v then, %v now", d.what, d.was, d.now)
		}
	}
	return ""
}

// refineKey is r's options as a comparable value ("" for none).
func refineKey(r *convert.Refine) string {
	if r == nil {
		return ""
	}
	return fmt.Sprintf("%+v", *r)
}

// Point is one measured model: the original or a conversion.
type Point struct {
	// Method is the method's name, "original" for the source.
	Method string `json:"method"`
	// MethodDetail (convert's method string), Format and RopeDim describe
	// the conversion; empty for the original.
	MethodDetail string `json:"method_detail,omitempty"`
	Format       string `json:"format,omitempty"`
	RopeDim      int    `json:"rope_dim,omitempty"`
	// DC is the latent width, 0 for the original.
	DC int `json:"dc"`
	// The KV cache per token over all layers, in values and in bytes of
	// the stored dtype.
	CacheValuesPerToken int   `json:"cache_values_per_token"`
	CacheBytesPerToken  int64 `json:"cache_bytes_per_token"`
	// The perplexity figures, as eval reports them.
	PPL          float64 `json:"ppl"`
	MeanNLL      float64 `json:"mean_nll"`
	TokensScored int     `json:"tokens_scored"`
	Windows      int     `json:"windows"`
	// Retained is the latent's weighted K_nope/V energy kept, the mean
	// over layers (0 for the original).
	Retained float64 `json:"retained,omitempty"`
	// Cache is the budget of a searched point (values per token and
	// layer); Chosen (convert's method string), RopeStride, FreqFold and
	// HeldOutPPL are the conversion the search chose and its score.
	Cache      int     `json:"cache_budget,omitempty"`
	Chosen     string  `json:"chosen_method,omitempty"`
	RopeStride float64 `json:"rope_stride,omitempty"`
	FreqFold   int     `json:"freqfold,omitempty"`
	HeldOutPPL float64 `json:"held_out_ppl,omitempty"`
	// ConvertSeconds builds this point from the shared factorization;
	// EvalSeconds evaluates it.
	ConvertSeconds float64 `json:"convert_seconds"`
	EvalSeconds    float64 `json:"eval_seconds"`
	// Version is the tool version that computed it.
	Version string `json:"tool_version"`
}

// pointFile is a point as saved in Dir/points.
type pointFile struct {
	Setup Setup `json:"setup"`
	Point
}

// spectraFile is a method's layer spectra as saved in Dir/points.
type spectraFile struct {
	Setup        Setup                   `json:"setup"`
	Method       string                  `json:"method"`
	MethodDetail string                  `json:"method_detail"`
	Format       string                  `json:"format"`
	RopeDim      int                     `json:"rope_dim"`
	MaxRank      int                     `json:"max_rank"`
	PlanSeconds  float64                 `json:"plan_seconds"`
	Layers       []convert.LayerSpectrum `json:"layers"`
}

// methodKey describes a method's conversion; a saved point of the same
// name and another key is stale.
type methodKey struct {
	detail, format string
	ropeDim        int
}

// keys are the methodKeys of the series the sweep computes, by name.
func (c *Config) keys() map[string]methodKey {
	keys := map[string]methodKey{}
	if len(c.Budgets) > 0 {
		for _, s := range c.series() {
			// The series' name carries its d_r; the search's base options
			// and format must match.
			k := c.key(c.Methods[0])
			k.detail, k.ropeDim = fmt.Sprintf("search(ctx=%d):%s", c.SearchCtx, k.detail), 0
			keys[s.name] = k
		}
		return keys
	}
	for _, m := range c.Methods {
		keys[m.Name] = c.key(m)
	}
	return keys
}

func (c *Config) key(m Method) methodKey {
	o := m.Options
	format := o.Format
	if format == "" {
		format = convert.DefaultFormat
	}
	return methodKey{o.Method(c.Calibration != nil), format, o.RopeDim}
}

var methodName = regexp.MustCompile(`^[A-Za-z0-9+._-]+$`)

func (c *Config) validate() error {
	switch {
	case c.Dir == "":
		return errors.New("sweep: no output directory")
	case len(c.Ranks) == 0 && len(c.Budgets) == 0:
		return errors.New("sweep: no latent widths or cache budgets")
	case len(c.Ranks) > 0 && len(c.Budgets) > 0:
		return errors.New("sweep: latent widths and cache budgets are two kinds of sweep; give one")
	case len(c.Budgets) > 0 && len(c.Methods) != 1:
		return errors.New("sweep: a budget sweep searches one method's settings")
	case c.Refine != nil && c.Calibration == nil:
		return errors.New("sweep: refinement fits each layer on calibration sequences; give a calibration file")
	case len(c.Budgets) > 0 && c.Calibration == nil:
		return errors.New("sweep: a budget sweep scores its candidates on held-out calibration text; give a calibration file")
	case len(c.RopeDims) > 0 && len(c.Budgets) == 0:
		return errors.New("sweep: rope-dim series apply to budget sweeps")
	case len(c.Methods) == 0:
		return errors.New("sweep: no methods")
	case c.Ctx < 2:
		return fmt.Errorf("sweep: ctx %d must be at least 2", c.Ctx)
	case c.MaxWindows < 0:
		return fmt.Errorf("sweep: max windows %d must not be negative", c.MaxWindows)
	}
	for i, r := range c.Ranks {
		if r <= 0 || slices.Contains(c.Ranks[:i], r) {
			return fmt.Errorf("sweep: latent width %d is not positive or repeated", r)
		}
	}
	for i, b := range c.Budgets {
		if b <= 0 || slices.Contains(c.Budgets[:i], b) {
			return fmt.Errorf("sweep: cache budget %d is not positive or repeated", b)
		}
	}
	for i, d := range c.RopeDims {
		if d <= 0 || d%2 != 0 || slices.Contains(c.RopeDims[:i], d) {
			return fmt.Errorf("sweep: rope dim %d is not positive and even, or repeated", d)
		}
	}
	for i, m := range c.Methods {
		if !methodName.MatchString(m.Name) || m.Name == originalName {
			return fmt.Errorf("sweep: method name %q: use letters, digits and +._- (and not %q)", m.Name, originalName)
		}
		for _, o := range c.Methods[:i] {
			if o.Name == m.Name {
				return fmt.Errorf("sweep: method %q given twice", m.Name)
			}
		}
	}
	return nil
}

// outsideModel refuses a results directory that is the model directory
// or lies inside it, also through symbolic links, as convert refuses such
// an output: the model is only read, and results beside its weights would
// be mistaken for part of it.
func outsideModel(model, dir string) error {
	if atomicfile.Inside(dir, model) {
		return fmt.Errorf("sweep: output %s is or lies inside the model %s, which a sweep never writes to; choose another directory", dir, model)
	}
	return nil
}

// originalName is the Method of the source's point.
const originalName = "original"

func pointPath(dir, method string, dc int) string {
	if method == originalName {
		return filepath.Join(dir, "points", "original.json")
	}
	return filepath.Join(dir, "points", fmt.Sprintf("%s-dc%d.json", method, dc))
}

func spectraPath(dir, method string) string {
	return filepath.Join(dir, "points", method+"-spectra.json")
}

func checkpointPath(dir, method string, dc int) string {
	return filepath.Join(dir, "checkpoints", fmt.Sprintf("%s-dc%d", method, dc))
}

// describe computes the setup of c.
func describe(c *Config) (Setup, error) {
	abs := func(p string) string {
		if a, err := filepath.Abs(p); err == nil {
			return a
		}
		return p
	}
	s := Setup{Model: abs(c.Model), Data: abs(c.Data), Ctx: c.Ctx, MaxWindows: c.MaxWindows, Refine: c.Refine}
	var err error
	if s.ModelConfigSHA256, err = fileSHA256(filepath.Join(c.Model, "config.json")); err != nil {
		return s, fmt.Errorf("model: %w", err)
	}
	files, err := filepath.Glob(filepath.Join(c.Model, "*.safetensors"))
	if err != nil {
		return s, err
	}
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			return s, fmt.Errorf("model: %w", err)
		}
		s.ModelBytes += st.Size()
	}
	if s.DataSHA256, err = fileSHA256(c.Data); err != nil {
		return s, fmt.Errorf("data: %w", err)
	}
	if cal := c.Calibration; cal != nil {
		h, err := fileSHA256(cal.File)
		if err != nil {
			return s, fmt.Errorf("calibration file: %w", err)
		}
		s.Calibration = &CalibrationSetup{File: abs(cal.File), SHA256: h, Tokens: cal.Tokens, SeqLen: cal.SeqLen, Seed: cal.Seed}
	}
	reader, err := model.OpenReader(c.Model)
	if err != nil {
		return s, err
	}
	defer reader.Close()
	s.DType = c.DType
	if s.DType == "" {
		s.DType = strings.ToLower(reader.StorageDType().String()) // --dtype's spelling
	}
	return s, nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// state is what Dir already holds.
type state struct {
	points  map[string]pointFile // by file path
	spectra map[string]spectraFile
}

// load reads Dir/points, and refuses (or with Force removes) results of
// another setup or of a requested method under other options.
func load(c *Config, setup Setup) (*state, error) {
	s := &state{points: map[string]pointFile{}, spectra: map[string]spectraFile{}}
	names, err := filepath.Glob(filepath.Join(c.Dir, "points", "*.json"))
	if err != nil {
		return nil, err
	}
	keys := c.keys()
	for _, name := range names {
		// Reading a named pipe would wait for a writer forever.
		if fi, err := os.Stat(name); err == nil && !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%s is not a regular file; remove it, or choose another output directory", name)
		}
		data, err := os.ReadFile(name)
		if err != nil {
			return nil, err
		}
		var (
			was    Setup
			method string
			key    methodKey
			keep   func()
		)
		if isSpectra(name) {
			var f spectraFile
			err = json.Unmarshal(data, &f)
			was, method, key = f.Setup, f.Method, methodKey{f.MethodDetail, f.Format, f.RopeDim}
			keep = func() { s.spectra[name] = f }
		} else {
			var f pointFile
			err = json.Unmarshal(data, &f)
			was, method, key = f.Setup, f.Method, methodKey{f.MethodDetail, f.Format, f.RopeDim}
			if f.Cache > 0 {
				key.ropeDim = 0 // a searched point's d_r is its choice
			}
			keep = func() { s.points[name] = f }
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w (delete it, or pass --force)", name, err)
		}
		why := setup.differs(was)
		if k, ok := keys[method]; ok && why == "" && k != key {
			why = fmt.Sprintf("method %s was %s (%s, rope dim %d), now %s (%s, rope dim %d)", method, key.detail, key.format, key.ropeDim, k.detail, k.format, k.ropeDim)
		}
		if why == "" {
			keep()
			continue
		}
		if !c.Force {
			return nil, fmt.Errorf("%s holds results of other settings (%s: %s); pass --force to discard them, or choose another output directory", c.Dir, filepath.Base(name), why)
		}
		if err := os.Remove(name); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func isSpectra(name string) bool { return strings.HasSuffix(name, "-spectra.json") }

// task is one point to compute.
type task struct {
	method int // index into Config.Methods; -1 for the original
	dc     int
	eval   bool // evaluate (else only write its checkpoint)
}

// Run runs the sweep: the points already in Dir (same setup and method)
// are kept unless Force, the others are computed, and the results files
// and plots are rewritten after each point and at the end.
func Run(ctx context.Context, c Config) (*Results, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	if err := outsideModel(c.Model, c.Dir); err != nil {
		return nil, err
	}
	if c.Backend == nil {
		c.Backend = kernels.Gonum{}
	}
	setup, err := describe(&c)
	if err != nil {
		return nil, err
	}
	// A link at Dir is kept: its target is the results directory.
	target, exists, err := atomicfile.OutputDir(c.Dir)
	if err != nil {
		return nil, fmt.Errorf("sweep: %w", err)
	}
	points := filepath.Join(target, "points")
	if err := os.MkdirAll(points, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", c.Dir, err)
	}
	res, err := c.resume(ctx, setup)
	if err != nil {
		// A sweep that failed before finishing anything leaves no empty
		// directories behind; os.Remove keeps any that hold a file.
		os.Remove(points)
		if !exists {
			os.Remove(target)
		}
		return nil, err
	}
	return res, nil
}

// resume computes the points that Dir/points lacks and rebuilds the
// results.
func (c *Config) resume(ctx context.Context, setup Setup) (*Results, error) {
	st, err := load(c, setup)
	if err != nil {
		return nil, err
	}
	if len(c.Budgets) > 0 {
		return c.resumeBudgets(ctx, setup, st)
	}

	// What is left to do.
	_, haveOriginal := st.points[pointPath(c.Dir, originalName, 0)]
	evalOriginal := c.Force || !haveOriginal
	var tasks []task
	needSpectra := make([]bool, len(c.Methods))
	for mi, m := range c.Methods {
		_, have := st.spectra[spectraPath(c.Dir, m.Name)]
		needSpectra[mi] = c.Force || !have
		for _, dc := range c.Ranks {
			if work, eval := c.pending(st, pointPath(c.Dir, m.Name, dc), checkpointPath(c.Dir, m.Name, dc)); work {
				tasks = append(tasks, task{method: mi, dc: dc, eval: eval})
				needSpectra[mi] = true
			}
		}
	}
	var planMethods []int
	for mi, need := range needSpectra {
		if need {
			planMethods = append(planMethods, mi)
		}
	}
	r := &runner{c: c, setup: setup, st: st, steps: len(tasks)}
	if evalOriginal {
		r.steps++
	}
	if len(planMethods) > 0 {
		r.steps++
	}
	if evalOriginal || slices.ContainsFunc(tasks, func(t task) bool { return t.eval }) {
		if r.ids, err = r.tokenize(); err != nil {
			return nil, err
		}
	}
	if err := r.run(ctx, planMethods, evalOriginal, tasks); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("interrupted; the finished points are kept in %s and running the same command again resumes: %w", c.Dir, err)
		}
		return nil, err
	}
	return r.rebuild()
}

// run computes what is left: the plan first, as it checks the conversion
// options before anything long runs, then the original, then the points.
func (r *runner) run(ctx context.Context, planMethods []int, evalOriginal bool, tasks []task) error {
	var plan *convert.Plan
	if len(planMethods) > 0 {
		var err error
		if plan, err = r.plan(ctx, planMethods); err != nil {
			return err
		}
	}
	if evalOriginal {
		if err := r.original(ctx); err != nil {
			return err
		}
	}
	for _, t := range tasks {
		if err := r.point(ctx, plan, planMethods, t); err != nil {
			return err
		}
	}
	return nil
}

// runner carries a sweep's state between its steps.
type runner struct {
	c     *Config
	setup Setup
	st    *state
	ids   []int
	step  int
	steps int
	// measured holds the budget points evaluated in this run by their
	// conversion, so that a series choosing the same one reuses it.
	measured map[convert.Candidate]measuredPoint
}

type measuredPoint struct {
	p   Point
	res eval.PerplexityResult
}

func (r *runner) progress(what string, done, total int, finished *Row) {
	if r.c.Progress != nil {
		r.c.Progress(Event{Step: r.step, Steps: r.steps, What: what, Done: done, Total: total, Finished: finished})
	}
}

// tokenize encodes the evaluation text as eval does.
func (r *runner) tokenize() ([]int, error) {
	text, err := os.ReadFile(r.c.Data)
	if err != nil {
		return nil, fmt.Errorf("read data: %w", err)
	}
	tok, err := tokenizer.Load(filepath.Join(r.c.Model, "tokenizer.json"))
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", r.c.Model, err)
	}
	ids := tok.Encode(string(text), true)
	if len(ids) < r.c.Ctx {
		return nil, fmt.Errorf("the data has %d tokens, fewer than one window of %d", len(ids), r.c.Ctx)
	}
	return ids, nil
}

// perplexity evaluates m on the sweep's windows.
func (r *runner) perplexity(ctx context.Context, m *model.Model, what string) (eval.PerplexityResult, error) {
	if max := m.Config.MaxPositionEmbeddings; max > 0 && r.c.Ctx > max {
		return eval.PerplexityResult{}, fmt.Errorf("ctx %d exceeds the model's max_position_embeddings %d", r.c.Ctx, max)
	}
	runner, err := eval.NewRunner(m, r.c.Backend, r.c.Ctx)
	if err != nil {
		return eval.PerplexityResult{}, err
	}
	return eval.Perplexity(ctx, runner, r.ids, eval.PerplexityOptions{
		Ctx: r.c.Ctx, MaxWindows: r.c.MaxWindows,
		Progress: func(done, total int) { r.progress(what, done, total, nil) },
	})
}

// original evaluates the source model.
func (r *runner) original(ctx context.Context) error {
	r.step++
	r.progress("eval original", 0, 1, nil)
	m, err := model.Load(ctx, r.c.Model, nil)
	if err != nil {
		return err
	}
	start := time.Now()
	res, err := r.perplexity(ctx, m, "eval original")
	if err != nil {
		return fmt.Errorf("eval %s: %w", r.c.Model, err)
	}
	p := Point{Method: originalName, CacheValuesPerToken: m.Config.KVCacheValuesPerToken(), CacheBytesPerToken: m.KVCacheBytesPerToken(),
		EvalSeconds: time.Since(start).Seconds()}
	return r.save(pointPath(r.c.Dir, originalName, 0), p, res)
}

// plan calibrates and factors once for the methods listed, at the largest
// requested width, and saves their spectra.
func (r *runner) plan(ctx context.Context, methods []int) (*convert.Plan, error) {
	r.step++
	start := time.Now()
	maxRank := slices.Max(r.c.Ranks)
	job := convert.PlanJob{Source: r.c.Model, DType: r.c.DType, Calibration: r.c.Calibration, Backend: r.c.Backend, Version: r.c.Version}
	for _, mi := range methods {
		o := r.c.Methods[mi].Options
		o.Rank = maxRank
		job.Methods = append(job.Methods, o)
	}
	job.Progress = func(ev convert.Event) {
		what := "calibrate and factor"
		if r.c.Calibration == nil {
			what = "factor"
		}
		r.progress(what, ev.Layer, ev.Layers, nil)
	}
	plan, err := convert.NewPlan(ctx, job)
	if err != nil {
		return nil, fmt.Errorf("convert %s: %w", r.c.Model, err)
	}
	secs := time.Since(start).Seconds()
	for i, mi := range methods {
		m := r.c.Methods[mi]
		k := r.c.key(m)
		f := spectraFile{Setup: r.setup, Method: m.Name, MethodDetail: k.detail, Format: k.format, RopeDim: k.ropeDim,
			MaxRank: maxRank, PlanSeconds: secs, Layers: plan.Spectra(i)}
		path := spectraPath(r.c.Dir, m.Name)
		if err := writeJSONFile(path, f); err != nil {
			return nil, err
		}
		r.st.spectra[path] = f
	}
	return plan, nil
}

// point builds, evaluates and saves one conversion, and writes its
// checkpoint when asked to.
func (r *runner) point(ctx context.Context, plan *convert.Plan, planMethods []int, t task) error {
	r.step++
	m := r.c.Methods[t.method]
	pi := slices.Index(planMethods, t.method)
	what := fmt.Sprintf("%s dc %d", m.Name, t.dc)
	if t.eval {
		r.progress("build "+what, 0, 1, nil)
		start := time.Now()
		cm, reports, err := r.build(ctx, func(dir string) (*convert.Summary, error) {
			return plan.Write(ctx, pi, t.dc, dir, true, r.c.Refine, nil)
		}, func() (*model.Model, []convert.LayerReport, error) { return plan.Model(pi, t.dc) })
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		built := time.Since(start).Seconds()
		start = time.Now()
		res, err := r.perplexity(ctx, cm, "eval "+what)
		if err != nil {
			return fmt.Errorf("eval %s: %w", what, err)
		}
		k := r.c.key(m)
		p := Point{Method: m.Name, MethodDetail: k.detail, Format: k.format, RopeDim: k.ropeDim, DC: t.dc,
			CacheValuesPerToken: cm.Config.KVCacheValuesPerToken(), CacheBytesPerToken: cm.KVCacheBytesPerToken(),
			ConvertSeconds: built, EvalSeconds: time.Since(start).Seconds()}
		for _, rep := range reports {
			p.Retained += rep.Retained / float64(len(reports))
		}
		if err := r.save(pointPath(r.c.Dir, m.Name, t.dc), p, res); err != nil {
			return err
		}
	}
	if r.c.KeepCheckpoints {
		r.progress("write "+what, 0, 1, nil)
		if err := os.MkdirAll(filepath.Join(r.c.Dir, "checkpoints"), 0o755); err != nil {
			return err
		}
		if _, err := plan.Write(ctx, pi, t.dc, checkpointPath(r.c.Dir, m.Name, t.dc), true, r.c.Refine, nil); err != nil {
			return fmt.Errorf("write %s: %w", what, err)
		}
	}
	return nil
}

// build is one point's converted model: in memory from the plan, or, with
// refinement, written by write (refined as convert --refine refines) to a
// temporary directory and read back.
func (r *runner) build(ctx context.Context, write func(dir string) (*convert.Summary, error), inMemory func() (*model.Model, []convert.LayerReport, error)) (*model.Model, []convert.LayerReport, error) {
	if r.c.Refine == nil {
		return inMemory()
	}
	tmp, err := os.MkdirTemp(r.c.Dir, ".refined-*")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(tmp)
	dir := filepath.Join(tmp, "model")
	sum, err := write(dir)
	if err != nil {
		return nil, nil, err
	}
	m, err := model.Load(ctx, dir, nil)
	if err != nil {
		return nil, nil, err
	}
	return m, sum.Layers, nil
}

// save records a finished point and rewrites the results with it.
func (r *runner) save(path string, p Point, res eval.PerplexityResult) error {
	p.PPL, p.MeanNLL, p.TokensScored, p.Windows = res.PPL, res.MeanNLL, res.TokensScored, res.Windows
	p.Version = r.c.Version
	f := pointFile{Setup: r.setup, Point: p}
	if err := writeJSONFile(path, f); err != nil {
		return err
	}
	r.st.points[path] = f
	results, err := r.rebuild()
	if err != nil {
		return err
	}
	for i := range results.Points {
		if row := &results.Points[i]; row.Method == p.Method && row.DC == p.DC {
			r.progress(p.Method, 1, 1, row)
		}
	}
	if p.Method == originalName && results.Original != nil {
		r.progress(p.Method, 1, 1, results.Original)
	}
	return nil
}

func writeJSONFile(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(data, '\n'), 0o644)
}

// pending says whether a point of the sweep has work left: its evaluation
// (missing from the state, or --force), or a checkpoint that
// --keep-checkpoints asks for and the directory lacks.
func (c *Config) pending(st *state, point, checkpoint string) (work, eval bool) {
	_, done := st.points[point]
	eval = c.Force || !done
	if c.KeepCheckpoints {
		_, err := os.Stat(checkpoint)
		work = c.Force || errors.Is(err, fs.ErrNotExist)
	}
	return work || eval, eval
}
