package sweep

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"image/png"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/transmla/transmla/convert"
	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/desttest"
	"github.com/transmla/transmla/internal/sharedtest"
	"github.com/transmla/transmla/internal/synthtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/tokenizer"
)

func relDiff(a, b float64) float64 { return math.Abs(a-b) / math.Abs(b) }

// evalDir evaluates a checkpoint directory as `transmla eval` does: its
// own tokenizer, the whole data file encoded, the same windows.
func evalDir(t *testing.T, dir, data string, ctx, windows int) float64 {
	t.Helper()
	m, err := model.Load(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.Load(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	text, err := os.ReadFile(data)
	if err != nil {
		t.Fatal(err)
	}
	r, err := eval.NewRunner(m, kernels.NewNative(), ctx)
	if err != nil {
		t.Fatal(err)
	}
	res, err := eval.Perplexity(context.Background(), r, tok.Encode(string(text), true), eval.PerplexityOptions{Ctx: ctx, MaxWindows: windows})
	if err != nil {
		t.Fatal(err)
	}
	return res.PPL
}

// Every point of a sweep of stories260K has the perplexity that convert
// at that width followed by eval of the written checkpoint gives, and so
// has the original: the sweep's truncated factorization, in-memory model
// and bf16 rounding change nothing that matters.
func TestSweepMatchesConvertThenEval(t *testing.T) {
	if testing.Short() {
		t.Skip("runs seven conversions and evaluations: skipped with -short")
	}
	src := sharedtest.Path(t, "models/stories260K")
	data := sharedtest.Path(t, "data/wikitext-2-raw/wiki.test.raw")
	heldout, err := os.ReadFile(sharedtest.Path(t, "data/calibration/heldout.txt"))
	if err != nil {
		t.Fatal(err)
	}
	// A slice of the calibration text, quick to tokenize.
	calib := filepath.Join(t.TempDir(), "calib.txt")
	if err := os.WriteFile(calib, heldout[:300_000], 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := model.LoadConfig(src)
	if err != nil {
		t.Fatal(err)
	}
	ranks := []int{4, 8, 16, 24, 32, 48, 56} // 56 = 2·4·8 − 8, the lossless bound
	opts := convert.DefaultOptions(cfg, 0)
	cal := &convert.Calibration{File: calib, Tokens: 8192, SeqLen: 512, Seed: 42}
	const ctxLen, windows = 256, 4
	dir := t.TempDir()
	res, err := Run(context.Background(), Config{
		Model: src, Ranks: ranks, Methods: []Method{{Name: "rorope+attention", Options: opts}},
		DType: "bf16", Calibration: cal, Data: data, Ctx: ctxLen, MaxWindows: windows, Dir: dir,
		Backend: kernels.NewNative(), Version: "test",
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Original == nil || len(res.Points) != len(ranks) {
		t.Fatalf("results: original %v, %d points, want %d", res.Original, len(res.Points), len(ranks))
	}
	if want := evalDir(t, src, data, ctxLen, windows); relDiff(res.Original.PPL, want) > 1e-4 {
		t.Errorf("original: sweep ppl %.6f, eval %.6f", res.Original.PPL, want)
	}
	var worst float64
	for i, p := range res.Points {
		if p.DC != ranks[i] {
			t.Fatalf("point %d has d_c %d, want %d", i, p.DC, ranks[i])
		}
		o := opts
		o.Rank = p.DC
		out := filepath.Join(t.TempDir(), "mla")
		if _, err := convert.Run(context.Background(), convert.Job{Source: src, Output: out, Options: o, DType: "bf16", Calibration: cal, Backend: kernels.NewNative()}); err != nil {
			t.Fatal(err)
		}
		want := evalDir(t, out, data, ctxLen, windows)
		d := relDiff(p.PPL, want)
		worst = max(worst, d)
		if d > 1e-4 {
			t.Errorf("d_c %d: sweep ppl %.6f, convert + eval %.6f (relative difference %.2g)", p.DC, p.PPL, want, d)
		}
	}
	t.Logf("largest relative difference over %d points: %.3g", len(ranks), worst)
}

// synthetic writes the built-in checkpoint with a byte-level tokenizer,
// and a text to calibrate and evaluate on.
func synthetic(t *testing.T) (dir, text string) {
	t.Helper()
	dir = synthtest.Checkpoint(t, model.DefaultSynthetic())
	text = filepath.Join(t.TempDir(), "text.txt")
	var b strings.Builder
	for i := range 300 {
		b.WriteString("Every point of the sweep is saved as it completes; line ")
		b.WriteString(strings.Repeat("z", i%5))
		b.WriteString(".\n")
	}
	if err := os.WriteFile(text, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir, text
}

// syntheticConfig is a quick sweep of the synthetic model; evals records
// the steps that evaluated something.
func syntheticConfig(t *testing.T, ranks []int, evals *[]string) Config {
	t.Helper()
	src, text := synthetic(t)
	cfg, err := model.LoadConfig(src)
	if err != nil {
		t.Fatal(err)
	}
	return Config{
		Model: src, Ranks: ranks,
		Methods: []Method{
			{Name: "rorope+attention", Options: convert.DefaultOptions(cfg, 0)},
			{Name: "2norm+none", Options: convert.Options{RopeDim: 32, RopeMethod: rope.Method2Norm, Weighting: convert.WeightNone}},
		},
		Calibration: &convert.Calibration{File: text, Tokens: 1024, SeqLen: 128, Seed: 1},
		Data:        text, Ctx: 128, MaxWindows: 2, Dir: filepath.Join(t.TempDir(), "sweep"),
		Backend: kernels.NewNative(), Version: "test",
		Progress: func(ev Event) {
			if strings.HasPrefix(ev.What, "eval ") && ev.Done == ev.Total && ev.Finished == nil {
				*evals = append(*evals, strings.TrimPrefix(ev.What, "eval "))
			}
		},
	}
}

// A second run skips what the first computed; a longer list computes only
// the new widths; other settings are refused unless forced.
func TestSweepResumes(t *testing.T) {
	var evals []string
	c := syntheticConfig(t, []int{16, 8}, &evals)
	first, err := Run(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"original", "rorope+attention dc 16", "rorope+attention dc 8", "2norm+none dc 16", "2norm+none dc 8"}
	if !slices.Equal(evals, want) {
		t.Fatalf("first run evaluated %q, want %q", evals, want)
	}
	evals = nil
	again, err := Run(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if len(evals) != 0 {
		t.Errorf("second run evaluated %q, want nothing", evals)
	}
	if a, b := mustJSON(t, first), mustJSON(t, again); a != b {
		t.Errorf("second run changed the results:\n%s\n%s", a, b)
	}
	c.Ranks = []int{8, 16, 24}
	evals = nil
	if _, err := Run(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if want := []string{"rorope+attention dc 24", "2norm+none dc 24"}; !slices.Equal(evals, want) {
		t.Errorf("extended run evaluated %q, want %q", evals, want)
	}

	// Other settings: refused, naming what differs and --force.
	for _, tc := range []struct {
		name   string
		change func(*Config)
		want   string
	}{
		{"windows", func(c *Config) { c.MaxWindows = 1 }, "max windows"},
		{"method options", func(c *Config) { c.Methods[1].Options.Weighting = convert.WeightBalanced }, "method 2norm+none"},
		{"calibration", func(c *Config) { c.Calibration.Seed = 2 }, "calibration"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			changed := c
			changed.Methods = slices.Clone(c.Methods)
			cal := *c.Calibration
			changed.Calibration = &cal
			tc.change(&changed)
			_, err := Run(context.Background(), changed)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "--force") {
				t.Errorf("error %v, want one naming %q and --force", err, tc.want)
			}
		})
	}
	evals = nil
	c.MaxWindows, c.Force = 1, true
	forced, err := Run(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if len(evals) != 7 || forced.Original.Windows != 1 || len(forced.Points) != 6 {
		t.Errorf("forced run: %d evaluations, %d windows, %d points; want 7, 1, 6", len(evals), forced.Original.Windows, len(forced.Points))
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Cancelled after its first point, a sweep keeps that point, leaves no
// partial file, and the next run computes only the rest.
func TestSweepInterruptKeepsCompletePoints(t *testing.T) {
	var evals []string
	c := syntheticConfig(t, []int{8, 16, 24}, &evals)
	c.Methods = c.Methods[:1]
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	progress := c.Progress
	c.Progress = func(ev Event) {
		progress(ev)
		if ev.Finished != nil && ev.Finished.Method != originalName {
			cancel()
		}
	}
	if _, err := Run(ctx, c); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted run: %v, want context.Canceled", err)
	}
	entries, err := os.ReadDir(filepath.Join(c.Dir, "points"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"original.json", "rorope+attention-dc8.json", "rorope+attention-spectra.json"}; !slices.Equal(names, want) {
		t.Errorf("points after the interrupt: %q, want %q", names, want)
	}
	c.Progress = progress
	evals = nil
	res, err := Run(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"rorope+attention dc 16", "rorope+attention dc 24"}; !slices.Equal(evals, want) || len(res.Points) != 3 {
		t.Errorf("resumed run evaluated %q (%d points), want %q", evals, len(res.Points), want)
	}
}

// The results files agree with each other and with the points; the plots
// decode as PNG and SVG.
func TestSweepFiles(t *testing.T) {
	var evals []string
	c := syntheticConfig(t, []int{8, 32}, &evals)
	c.KeepCheckpoints = true
	res, err := Run(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(c.Dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var fromJSON Results
	if err := json.Unmarshal(read("results.json"), &fromJSON); err != nil {
		t.Fatal(err)
	}
	if mustJSON(t, fromJSON) != mustJSON(t, res) {
		t.Error("results.json differs from the returned results")
	}
	records, err := csv.NewReader(bytes.NewReader(read("results.csv"))).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(records[0], csvHeader) || len(records) != 1+1+4 {
		t.Fatalf("results.csv: header %q, %d rows; want %q and 6", records[0], len(records), csvHeader)
	}
	o := res.Original
	if records[1][0] != originalName || records[1][1] != "" || records[1][5] != "100" {
		t.Errorf("original row %q", records[1])
	}
	md := string(read("results.md"))
	for _, r := range res.Points {
		// Cache and Δppl follow from the points' own figures.
		if pct := 100 * float64(r.CacheValuesPerToken) / float64(o.CacheValuesPerToken); math.Abs(r.CachePercent-pct) > 1e-9 {
			t.Errorf("%s dc %d: cache %v%%, want %v%%", r.Method, r.DC, r.CachePercent, pct)
		}
		// Synthetic: 4 layers of (d_c + 32) values against 4·2·2·32.
		if r.CacheValuesPerToken != 4*(r.DC+32) {
			t.Errorf("%s dc %d: %d cache values per token, want %d", r.Method, r.DC, r.CacheValuesPerToken, 4*(r.DC+32))
		}
		if d := 100 * (r.PPL/o.PPL - 1); math.Abs(r.DeltaPPLPercent-d) > 1e-9 {
			t.Errorf("%s dc %d: Δppl %v%%, want %v%%", r.Method, r.DC, r.DeltaPPLPercent, d)
		}
		if !strings.Contains(md, "| "+r.Method+" | ") {
			t.Errorf("results.md lacks method %s", r.Method)
		}
		// The kept checkpoint evaluates to the point's perplexity.
		ckpt := filepath.Join(c.Dir, "checkpoints", r.Method+"-dc"+strconv.Itoa(r.DC))
		if got := evalDir(t, ckpt, c.Data, c.Ctx, c.MaxWindows); relDiff(got, r.PPL) > 1e-4 {
			t.Errorf("%s: ppl %v, the point says %v", ckpt, got, r.PPL)
		}
	}
	for _, name := range []string{"ppl_vs_cache", "spectra-rorope+attention", "spectra-2norm+none"} {
		img, err := png.Decode(bytes.NewReader(read(name + ".png")))
		if err != nil {
			t.Fatalf("%s.png: %v", name, err)
		}
		if b := img.Bounds(); b.Dx() < 400 || b.Dy() < 300 {
			t.Errorf("%s.png is %v", name, b)
		}
		dec := xml.NewDecoder(bytes.NewReader(read(name + ".svg")))
		for {
			if _, err := dec.Token(); err == io.EOF {
				break
			} else if err != nil {
				t.Fatalf("%s.svg: %v", name, err)
			}
		}
	}
}

// A results directory that is the model or lies inside it is refused
// before anything is written: the model directory is only read.
func TestSweepRefusesOutputInsideModel(t *testing.T) {
	var evals []string
	c := syntheticConfig(t, []int{8}, &evals)
	before, err := os.ReadDir(c.Model)
	if err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "model-link")
	if err := os.Symlink(c.Model, link); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, dir string }{
		{"the model", c.Model},
		{"a child", filepath.Join(c.Model, "sweep")},
		{"a grandchild", filepath.Join(c.Model, "a", "b")},
		{"the model, spelt with a dot", c.Model + string(filepath.Separator) + "."},
		{"a symbolic link to the model", link},
		{"a child of a link to the model", filepath.Join(link, "sweep")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := c
			bad.Dir = tc.dir
			_, err := Run(context.Background(), bad)
			if err == nil || !strings.Contains(err.Error(), "inside the model") {
				t.Errorf("error %v, want one saying the output is inside the model", err)
			}
			after, err := os.ReadDir(c.Model)
			if err != nil {
				t.Fatal(err)
			}
			if len(after) != len(before) {
				t.Errorf("the model directory now holds %d entries, was %d", len(after), len(before))
			}
		})
	}
	// A sibling whose name starts with the model's is not inside it.
	ok := c
	ok.Dir = c.Model + "-sweep"
	if _, err := Run(context.Background(), ok); err != nil {
		t.Errorf("sibling output %s: %v", ok.Dir, err)
	}
}

// A sweep that fails before any point is finished leaves no directory of
// its own behind, and removes nothing that was there before.
func TestFailedSweepLeavesNoEmptyDirectory(t *testing.T) {
	var evals []string
	c := syntheticConfig(t, []int{16}, &evals)
	short := filepath.Join(t.TempDir(), "short.txt")
	if err := os.WriteFile(short, []byte("far too short to calibrate on"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.Calibration.File = short
	if _, err := Run(context.Background(), c); err == nil {
		t.Fatal("a sweep calibrated on a few tokens succeeded")
	}
	if _, err := os.Stat(c.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the failed sweep left %s behind (%v)", c.Dir, err)
	}
	// An existing directory, with a file of the user's, stays as it was.
	if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	mine := filepath.Join(c.Dir, "notes.txt")
	if err := os.WriteFile(mine, []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Run(context.Background(), c); err == nil {
		t.Fatal("a sweep calibrated on a few tokens succeeded")
	}
	if got := desttest.DirNames(t, c.Dir); !slices.Equal(got, []string{"notes.txt"}) {
		t.Errorf("after a failed sweep the directory holds %v, want only notes.txt", got)
	}
}

// A budget sweep measures, at each cache budget, the search's best
// conversion (series "best") and the best at each requested d_r: each
// point is that candidate, evaluated on the data, with the budget, the
// chosen settings and their held-out score; it resumes like a --dc sweep
// and refuses points of other base options.
func TestBudgetSweep(t *testing.T) {
	if testing.Short() {
		t.Skip("searches twice (-short)")
	}
	var evals []string
	c := syntheticConfig(t, nil, &evals)
	c.Methods = c.Methods[:1]
	c.Budgets, c.RopeDims = []int{48, 96}, []int{8, 16, 24, 32}
	res, err := Run(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	var search convert.SearchResult
	data, err := os.ReadFile(filepath.Join(c.Dir, searchJSON))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &search); err != nil {
		t.Fatal(err)
	}
	// A d_r series that chose the best's own conversion is not evaluated
	// again.
	want := []string{"original", "best cache 48", "best cache 96"}
	reused := 0
	for _, dr := range c.RopeDims {
		for _, b := range search.Budgets {
			cd, ok := b.BestWith(dr)
			if !ok {
				continue
			}
			if cd == b.Best() {
				reused++
				continue
			}
			want = append(want, fmt.Sprintf("dr%d cache %d", dr, b.Cache))
		}
	}
	if !slices.Equal(evals, want) || reused == 0 {
		t.Fatalf("evaluated %q, want %q (%d reused)", evals, want, reused)
	}
	if len(res.Points) != 10 || len(search.Budgets) != 2 {
		t.Fatalf("%d points, %d searched budgets", len(res.Points), len(search.Budgets))
	}
	for _, p := range res.Points {
		var chosen *convert.Candidate
		for i, b := range search.Budgets {
			for j, cd := range b.Candidates {
				if b.Cache == p.Cache && ((p.Method == bestSeries && cd.Best) || (p.Method == fmt.Sprintf("dr%d", cd.RopeDim) && cd.BestForRopeDim)) {
					chosen = &search.Budgets[i].Candidates[j]
				}
			}
		}
		if chosen == nil || p.DC != chosen.Rank || p.RopeDim != chosen.RopeDim || p.HeldOutPPL != chosen.PPL || p.RopeStride != chosen.RopeStride {
			t.Errorf("point %+v is not the search's choice %+v", p, chosen)
		}
		if p.DC+p.RopeDim > p.Cache || p.CacheValuesPerToken != (p.DC+p.RopeDim)*4 || !(p.PPL > 1) {
			t.Errorf("point %+v", p)
		}
	}
	evals = nil
	if _, err := Run(context.Background(), c); err != nil || len(evals) != 0 {
		t.Errorf("second run: %v, evaluated %q", err, evals)
	}
	c.Methods[0].Options.ValueWeight = 2
	if _, err := Run(context.Background(), c); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Errorf("other base options: error %v, want one asking for --force", err)
	}
}

// A refining sweep's point is what convert --refine then eval give, and
// its results are not mixed with those of other refinement settings.
func TestSweepRefineMatchesConvert(t *testing.T) {
	if testing.Short() {
		t.Skip("refines two synthetic conversions: skipped with -short")
	}
	var evals []string
	c := syntheticConfig(t, []int{16}, &evals)
	c.Methods = c.Methods[:1]
	c.DType = "f32"
	r := convert.Refine{Steps: 4, Batch: 2, LR: 0.02, Val: 2, Inputs: convert.InputsTeacher, Seed: 1}
	c.Refine = &r
	res, err := Run(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Points) != 1 {
		t.Fatalf("%d points, want 1", len(res.Points))
	}
	o := c.Methods[0].Options
	o.Rank = 16
	out := filepath.Join(t.TempDir(), "mla")
	if _, err := convert.Run(context.Background(), convert.Job{Source: c.Model, Output: out, Options: o, DType: "f32", Calibration: c.Calibration, Refine: &r, Backend: kernels.NewNative()}); err != nil {
		t.Fatal(err)
	}
	want := evalDir(t, out, c.Data, c.Ctx, c.MaxWindows)
	if d := relDiff(res.Points[0].PPL, want); d > 1e-3 {
		t.Errorf("sweep ppl %.6f, convert --refine + eval %.6f (relative difference %.2g)", res.Points[0].PPL, want, d)
	}
	plain := c
	plain.Refine = nil
	if _, err := Run(context.Background(), plain); err == nil || !strings.Contains(err.Error(), "refinement") {
		t.Errorf("a sweep without refinement over refined results: error %v, want one naming the refinement", err)
	}
}
