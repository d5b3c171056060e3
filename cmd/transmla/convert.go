package main

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/convert"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

// convertReport is the --json output of convert.
type convertReport struct {
	*convert.Summary
	PeakRSSBytes int64  `json:"peak_rss_bytes"`
	Backend      string `json:"backend"`
	// Search is the --cache search that chose the conversion.
	Search *convert.SearchResult `json:"search,omitempty"`
}

func convertCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:      "convert",
		Usage:     "rewrite a GQA checkpoint as MLA (DeepSeek-V3 layout) with a KV cache of --cache values (or a --dc-wide latent)",
		ArgsUsage: "MODEL",
		Description: `Moves RoPE into a decoupled key of --rope-dim dims shared by all heads, factors
the position-free keys and the values into one latent of --dc dims, folds the rest
into q_proj and kv_b_proj, and writes a DeepSeek-V3 checkpoint to -o DIR. The KV
cache per token and layer becomes dc + rope-dim values instead of 2·n_kv·head_dim.

--cache N (values per token and layer, or a percentage of the source's cache such as
50%) searches the split of N between the RoPE key (d_r) and the latent (d_c = N − d_r)
and the RoPE stage's slots and FreqFold, scoring every candidate by perplexity on the
calibration file's last windows (held out from calibration), and writes the best;
--dc with --rope-dim, --rope-stride and --freqfold instead fixes every choice.

With --calib FILE the factorizations use activation statistics of the model on that
text (never calibrate on the evaluation text); without it they use the weights only.
Layers are read, calibrated, converted and written one at a time. The output
directory appears only when complete; MODEL is never modified.`,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "directory to create (required)"},
			&cli.BoolFlag{Name: "force", Usage: "replace -o DIR if it exists (only once the new one is complete)"},
			&cli.StringFlag{Name: "cache", Usage: "KV cache per token and layer, d_c + d_r, in values (e.g. 256) or % of the source's (e.g. 50%): search the best split on the calibration text (needs --calib)"},
			&cli.IntFlag{Name: "search-ctx", Usage: "--cache: length of the held-out calibration windows the candidates are scored on (long-context models: the context they serve)", DefaultText: "min(1024, max_position_embeddings)"},
			&cli.IntFlag{Name: "dc", Usage: "latent width kv_lora_rank (instead of --cache); at most 2·n_kv·head_dim − rope-dim", DefaultText: "none: give --dc or --cache"},
			&cli.IntFlag{Name: "rope-dim", Usage: "decoupled RoPE key width qk_rope_head_dim, even (fixes it in a --cache search)", DefaultText: "64, or the largest even divisor of head_dim below it"},
			&cli.StringFlag{Name: "rope-stride", Usage: "RoPE slot i rotates at source frequency i·N: head_dim/rope-dim spreads the slots over all frequencies, 1 packs them on the fastest, 1/2 or 1/4 gives those two or four slots (rope_theta is set to match)", DefaultText: "head_dim/rope-dim"},
			&cli.StringFlag{Name: "rope-rank", Usage: "rorope: rank components by the score variance they carry (score: key energy seen through the queries) or by key energy (key, TransMLA's); auto is score when calibrated, key when data-free", Value: "auto"},
			&cli.StringFlag{Name: "rope-select", Usage: "which key dims keep RoPE: rorope (PCA across KV heads), or per-head pairs 2norm, high, uniform", Value: rope.MethodRoRoPE},
			&cli.StringFlag{Name: "freqfold", Usage: "rorope: adjacent frequencies rotated together, a multiple of the stride, or auto (two slots' worth where those frequencies are within 2×)", Value: "auto"},
			&cli.Float64Flag{Name: "nope-span", Usage: "data-free: read each de-rotated key through its mean lost rotation over distances 0..N (0 = off); calibrated conversions measure the distances", Value: convert.DefaultNopeSpan},
			&cli.StringFlag{Name: "weighting", Usage: "latent error weight: attention (keys through queries, values through o_proj), bkv (balanced K/V), none", Value: convert.WeightAttention},
			&cli.Float64Flag{Name: "value-weight", Usage: "attention weighting: weight of value error relative to key error", Value: 1},
			&cli.StringFlag{Name: "calib", Usage: "calibration text file (activation-aware factorization)"},
			&cli.IntFlag{Name: "calib-tokens", Usage: "calibration tokens run through the model", Value: 32768},
			&cli.IntFlag{Name: "calib-seq", Usage: "length of each calibration sequence", Value: 512},
			&cli.Uint64Flag{Name: "seed", Usage: "seed that picks the calibration sequences", Value: 42},
			&cli.StringFlag{Name: "format", Usage: "deepseek-v3-stock (loads in transformers and vLLM) or exact (this tool's eval only)", Value: convert.DefaultFormat},
			&cli.StringFlag{Name: "target", Usage: "engine to write for: " + strings.Join(convert.TargetNames(), ", ") + "; refuses what it cannot compute and pads the latent to a width it accepts", Value: convert.TargetAny},
			&cli.IntFlag{Name: "pad-latent", Usage: "store the latent padded with zeros to this kv_lora_rank (engines cache the padding, transmla eval does not)", DefaultText: "none, or what --target needs"},
			&cli.StringFlag{Name: "dtype", Usage: "stored dtype: bf16, f16, f32 (default: the source's)"},
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object instead of the table"},
		}, refineFlags()...),
		Action: func(c *cli.Context) error {
			if err := requireFlags(c, "output"); err != nil {
				return err
			}
			search := c.IsSet("cache")
			switch {
			case search && c.IsSet("dc"):
				return usagef("convert: give --cache (search the split) or --dc (fix it), not both")
			case !search && !c.IsSet("dc"):
				return usagef("convert: --cache N (or N%%) or --dc N is required (see transmla convert --help)")
			case search && (c.IsSet("rope-stride") || c.IsSet("freqfold") || c.IsSet("rope-select")):
				return usagef("convert --cache chooses the RoPE slots and FreqFold itself (rorope); fix them with --dc, --rope-dim, --rope-stride, --freqfold instead")
			}
			dir, cfg, err := gqaSource(c)
			if err != nil {
				return err
			}
			opts := convert.DefaultOptions(cfg, c.Int("dc"))
			if c.IsSet("rope-dim") {
				opts.RopeDim = c.Int("rope-dim")
			}
			if opts.RopeStride, err = parseRopeStride(c.String("rope-stride")); err != nil {
				return err
			}
			if r := c.String("rope-rank"); r != "auto" {
				opts.RopeRank = r
			}
			opts.RopeMethod = c.String("rope-select")
			opts.NopeSpan = c.Float64("nope-span")
			opts.Weighting = c.String("weighting")
			opts.ValueWeight = c.Float64("value-weight")
			opts.Format = c.String("format")
			opts.Target = c.String("target")
			opts.PadLatent = c.Int("pad-latent")
			if !(opts.ValueWeight > 0) {
				return usagef("--value-weight must be positive, got %v", opts.ValueWeight)
			}
			cal, err := calibrationFlags(c, "conversions", cfg)
			if err != nil {
				return err
			}
			refine, err := refineOptions(c, cal)
			if err != nil {
				return err
			}
			if err := checkDType(c); err != nil {
				return err
			}
			if opts.FreqFold, err = parseFreqFold(c.String("freqfold")); err != nil {
				return err
			}
			if opts.FreqFold == 0 && opts.RopeMethod == rope.MethodRoRoPE {
				opts.FreqFold = convert.AutoFreqFold(cfg, opts.RopeDim, opts.RopeStride)
			}
			be, err := backendFor(c)
			if err != nil {
				return err
			}
			if err := checkSearchCtx(c, cfg, search); err != nil {
				return err
			}
			if search {
				return searchConvert(c, dir, cfg, opts, cal, refine, be)
			}
			if err := opts.Validate(cfg); err != nil {
				return usageError{err}
			}
			job := convert.Job{
				Source: dir, Output: c.String("output"), Force: c.Bool("force"),
				Options: opts, DType: c.String("dtype"), Calibration: cal, Refine: refine, Backend: be, Version: version,
			}
			bar := newProgress(c.App.ErrWriter, cfg.NumLayers*3, "converting")
			job.Progress = layerProgress(bar, refine, []string{convert.StageCalibrate, convert.StageConvert, convert.StageWrite})
			sum, err := convert.Run(c.Context, job)
			bar.Done()
			if err != nil {
				return conversionError("convert", dir, err)
			}
			rep := convertReport{Summary: sum, PeakRSSBytes: peakRSS(), Backend: be.Name()}
			if c.Bool("json") {
				return writeJSON(c.App.Writer, rep)
			}
			printConvertTable(c.App.Writer, rep)
			return nil
		},
	})
}

func printConvertTable(w io.Writer, r convertReport) {
	fmt.Fprintf(w, "converted   %s → %s (%s, %s)\n", r.Source, r.Output, r.Format, r.DType)
	fmt.Fprintf(w, "method      %s\n", r.Method)
	if r.CalibrationSHA256 != "" {
		fmt.Fprintf(w, "calibrated  %d tokens (sha256 %.12s…)\n", r.CalibrationTokens, r.CalibrationSHA256)
	} else {
		fmt.Fprintf(w, "calibrated  no (data-free)\n")
	}
	if r.LatentRank != r.Rank {
		fmt.Fprintf(w, "latent      kv_lora_rank %d (%d dims + %d zero padding) + qk_rope_head_dim %d per layer\n", r.Rank, r.LatentRank, r.Rank-r.LatentRank, r.RopeDim)
	} else {
		fmt.Fprintf(w, "latent      kv_lora_rank %d + qk_rope_head_dim %d per layer\n", r.Rank, r.RopeDim)
	}
	fmt.Fprintf(w, "\n%-22s %16s %16s\n", "KV cache per token", "before (GQA)", "after (MLA)")
	fmt.Fprintf(w, "%-22s %16d %16d\n", "values, all layers", r.CacheValuesBefore, r.CacheValuesAfter)
	fmt.Fprintf(w, "%-22s %16s %16s\n", "bytes ("+r.DType+")", humanBytes(r.CacheBytesBefore), humanBytes(r.CacheBytesAfter))
	fmt.Fprintf(w, "%-22s %33.1f%%\n", "reduction", 100*r.Reduction)
	fmt.Fprintf(w, "\ntime        %.1f s (%s backend)\n", r.Seconds, r.Backend)
	if r.PeakRSSBytes > 0 {
		fmt.Fprintf(w, "peak memory %s RSS\n", humanBytes(r.PeakRSSBytes))
	}
	for _, l := range r.Layers {
		if f := l.Refine; f != nil {
			fmt.Fprintf(w, "refined     layer %d: held-back loss %.4g → %.4g (%s inputs, best of %d steps at step %d, %.1f s)\n",
				l.Layer, f.ValBefore, f.ValAfter, f.Inputs, f.Steps, f.BestStep, f.Seconds)
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note        %s\n", n)
	}
	fmt.Fprintf(w, "\n%-13s %-6s %14s  %s\n", "engine", "loads", "cache/token", "(transmla eval: "+strconv.Itoa(r.CacheValuesAfter)+" values per token, all layers)")
	for _, t := range r.Targets {
		loads, why := "yes", t.Engine
		if !t.Loads {
			loads, why = "no", t.Reason
		}
		fmt.Fprintf(w, "%-13s %-6s %14d  %s\n", t.Name, loads, t.CacheValuesPerToken, why)
	}
	fmt.Fprintf(w, "evaluate    transmla eval %s --data FILE\n", filepath.Clean(r.Output))
}

// parseCache reads --cache: values per token and layer, or a percentage
// of the source's 2·n_kv·head_dim.
func parseCache(s string, cfg model.Config) (int, error) {
	full := 2 * cfg.NumKVHeads * cfg.HeadDim
	var n int
	if p, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || !(f > 0) || f > 100 {
			return 0, usagef("--cache %q: want a percentage in (0, 100]", s)
		}
		n = int(math.Round(f / 100 * float64(full)))
	} else {
		v, err := strconv.Atoi(s)
		if err != nil || v <= 0 {
			return 0, usagef("--cache %q: want values per token and layer (e.g. 256) or a percentage of the source's %d (e.g. 50%%)", s, full)
		}
		n = v
	}
	if n < 2 {
		return 0, usagef("--cache %q is %d values, too few for a RoPE key and a latent", s, n)
	}
	return n, nil
}

// searchConvert runs convert --cache: the search, then the best
// candidate written as convert writes any conversion.
func searchConvert(c *cli.Context, dir string, cfg model.Config, base convert.Options, cal *convert.Calibration, refine *convert.Refine, be kernels.Backend) error {
	if cal == nil {
		return usagef("convert --cache scores its candidates on held-out calibration text: add --calib FILE (or fix the split with --dc and --rope-dim)")
	}
	budget, err := parseCache(c.String("cache"), cfg)
	if err != nil {
		return err
	}
	// The options that do not depend on the split are checked once, on
	// a shape that fits, so that a bad one is named as such rather than
	// as a budget that nothing fits.
	probe := base
	probe.Target, probe.PadLatent = "", 0
	probe.Rank = max(1, min(budget-probe.RopeDim, convert.LosslessRank(cfg, probe.RopeDim)))
	if err := probe.Validate(cfg); err != nil {
		return usageError{err}
	}
	if t := base.Target; t != "" && t != convert.TargetAny {
		if _, ok := convert.LookupTarget(t); !ok {
			return usagef("--target %q is not one of %v", t, convert.TargetNames())
		}
	}
	if !c.IsSet("rope-dim") {
		base.RopeDim = 0
	}
	job := convert.SearchJob{Source: dir, Budgets: []int{budget}, Base: base, DType: c.String("dtype"), Calibration: cal, Backend: be, Version: version, Ctx: c.Int("search-ctx")}
	// The output is checked before the search, not only when the result
	// is written minutes later.
	output, force := c.String("output"), c.Bool("force")
	if err := convert.CheckOutput(dir, output, force, cal); err != nil {
		return fmt.Errorf("convert %s: %w", dir, err)
	}
	bar := newProgress(c.App.ErrWriter, cfg.NumLayers*2, "searching")
	job.Progress = func(ev convert.Event) {
		switch ev.Stage {
		case convert.StageCalibrate, convert.StageConvert:
			i := 0
			if ev.Stage == convert.StageConvert {
				i = 1
			}
			bar.Set(ev.Layer*2+i, ev.Layers*2)
		case convert.StageScore:
			bar.Set(ev.Layer, ev.Layers)
		}
	}
	res, err := convert.Search(c.Context, job)
	bar.Done()
	if err != nil {
		return conversionError("convert", dir, err)
	}
	best := res.Budgets[0].Best()
	wbar := newProgress(c.App.ErrWriter, cfg.NumLayers, "writing")
	stages := []string{convert.StageWrite}
	if refine != nil {
		stages = []string{convert.StageCalibrate, convert.StageWrite}
	}
	sum, err := res.Write(c.Context, best, output, force, refine, layerProgress(wbar, refine, stages))
	wbar.Done()
	if err != nil {
		return fmt.Errorf("convert %s: %w", dir, err)
	}
	rep := convertReport{Summary: sum, PeakRSSBytes: peakRSS(), Backend: be.Name(), Search: res}
	if c.Bool("json") {
		return writeJSON(c.App.Writer, rep)
	}
	printSearchTable(c.App.Writer, res)
	printConvertTable(c.App.Writer, rep)
	return nil
}

// layerProgress moves bar through each layer's stages, in order; with
// refine, each layer also counts its optimizer steps, the description
// showing the layer and its batch loss.
func layerProgress(bar *progress, refine *convert.Refine, stages []string) func(convert.Event) {
	steps := 0
	if refine != nil {
		steps = refine.Steps
	}
	per := len(stages) + steps
	return func(ev convert.Event) {
		if ev.Stage == convert.StageRefine {
			// Refinement comes after every stage but the write.
			bar.Set(ev.Layer*per+len(stages)-1+ev.Step, ev.Layers*per)
			bar.Describe(fmt.Sprintf("refining layer %d/%d, loss %.4g", ev.Layer+1, ev.Layers, ev.Loss))
			return
		}
		for i, s := range stages {
			if s == ev.Stage {
				at := ev.Layer*per + i
				if s == convert.StageWrite {
					at += steps
					bar.Describe("converting")
				}
				bar.Set(at, ev.Layers*per)
			}
		}
	}
}

// printSearchTable lists a search's candidates per budget: the finalists
// by their held-out perplexity, then the others by their screening one.
func printSearchTable(w io.Writer, r *convert.SearchResult) {
	for _, b := range r.Budgets {
		fmt.Fprintf(w, "cache %d values per token and layer: %d candidates screened on %d held-out windows of %d tokens, the best %d scored on all %d\n",
			b.Cache, len(b.Candidates), r.ScreenWindows, r.Ctx, countFinalists(b), r.HeldOutTokens/max(r.Ctx, 1))
		fmt.Fprintf(w, "%6s %6s %7s %9s %11s %12s\n", "d_c", "d_r", "stride", "freqfold", "screen ppl", "held-out ppl")
		cands := slices.Clone(b.Candidates)
		slices.SortStableFunc(cands, func(x, y convert.Candidate) int {
			if (x.PPL > 0) != (y.PPL > 0) {
				if x.PPL > 0 {
					return -1
				}
				return 1
			}
			if x.PPL > 0 {
				return cmp.Compare(x.PPL, y.PPL)
			}
			return cmp.Compare(x.Screen, y.Screen)
		})
		for _, cd := range cands {
			final, mark := "", ""
			if cd.PPL > 0 {
				final = fmt.Sprintf("%.4f", cd.PPL)
			}
			if cd.Best {
				mark = "  ← best"
			}
			fmt.Fprintf(w, "%6d %6d %7g %9d %11.4f %12s%s\n", cd.Rank, cd.RopeDim, cd.RopeStride, cd.FreqFold, cd.Screen, final, mark)
		}
	}
	fmt.Fprintf(w, "search: %.1f s calibrating and analysing, %.1f s scoring\n\n", r.PlanSeconds, r.ScoreSeconds)
}

func countFinalists(b convert.BudgetResult) int {
	n := 0
	for _, c := range b.Candidates {
		if c.PPL > 0 {
			n++
		}
	}
	return n
}

// conversionError wraps an error of command cmd on model dir; the
// refusals that a flag causes or fixes (a budget nothing fits, the stock
// format as f16) are usage errors, exit 2.
func conversionError(cmd, dir string, err error) error {
	err = fmt.Errorf("%s %s: %w", cmd, dir, err)
	if berr := (*convert.BudgetError)(nil); errors.As(err, &berr) || errors.Is(err, convert.ErrStockF16) {
		return usageError{err}
	}
	return err
}
