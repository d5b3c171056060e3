package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/convert"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/sweep"
)

func sweepCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:      "sweep",
		Usage:     "convert at many --dc widths and tabulate and plot perplexity against KV cache",
		ArgsUsage: "MODEL",
		Description: `Converts MODEL at every latent width of --dc (and with every --method), evaluates
the original and each conversion on the same windows of --data, and writes to -o DIR:
results.csv, results.json, results.md (d_c, cache values/token, cache % of the
original, ppl, Δppl %, time), ppl_vs_cache.png/.svg and per-layer spectra plots
spectra-METHOD.png/.svg. Calibration runs once and each layer is factored once; every
width is a truncation of that one factorization, and each point is exactly what
convert --dc N followed by eval gives.

With --cache LIST instead of --dc, each point is a KV-cache budget (values per token and
layer, or % of the source's): the split between d_r and d_c and the RoPE settings are
searched as convert --cache searches them (scored on held-out calibration text, never on
--data), one search for all budgets, and the best is measured: series "best", and with
--rope-dim LIST one series "drN" per fixed d_r. DIR/search.json holds every candidate's
score.

Each point is saved in DIR/points as it completes: running the same command again
skips finished points (Ctrl-C loses only the point in progress). Results of other
settings in DIR are refused; --force discards them and recomputes every point.`,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "dc", Usage: "latent widths kv_lora_rank, comma-separated, e.g. 32,64,128,192,256,320,448"},
			&cli.StringFlag{Name: "cache", Usage: "instead of --dc: KV-cache budgets per token and layer (values or % of the source's), comma-separated, e.g. 128,192,256,320,512; the split is searched (needs --calib)"},
			&cli.IntFlag{Name: "search-ctx", Usage: "--cache: length of the held-out calibration windows candidates are scored on", DefaultText: "min(1024, max_position_embeddings)"},
			&cli.StringFlag{Name: "method", Usage: "comma-separated methods, each ROPE-SELECT+WEIGHTING (either part alone keeps the other's default): rope-select " + strings.Join(rope.Methods(), ", ") + "; weighting " + strings.Join(convert.Weightings(), ", "), Value: rope.MethodRoRoPE + "+" + convert.WeightAttention},
			&cli.StringFlag{Name: "rope-dim", Usage: "decoupled RoPE key width qk_rope_head_dim; with --cache, a comma-separated list of d_r series", DefaultText: "64, or the largest even divisor of head_dim below it"},
			&cli.StringFlag{Name: "rope-stride", Usage: "RoPE slot i rotates at source frequency i·N (see convert --help; not with --cache)", DefaultText: "head_dim/rope-dim"},
			&cli.StringFlag{Name: "freqfold", Usage: "rorope: adjacent frequencies rotated together, a multiple of the stride, or auto (see convert --help; not with --cache)", Value: "auto"},
			&cli.Float64Flag{Name: "nope-span", Usage: "data-free: read each de-rotated key through its mean lost rotation over distances 0..N (0 = off); calibrated sweeps measure the distances", Value: convert.DefaultNopeSpan},
			&cli.Float64Flag{Name: "value-weight", Usage: "attention weighting: weight of value error relative to key error", Value: 1},
			&cli.StringFlag{Name: "calib", Usage: "calibration text file (activation-aware factorization)"},
			&cli.IntFlag{Name: "calib-tokens", Usage: "calibration tokens run through the model", Value: 32768},
			&cli.IntFlag{Name: "calib-seq", Usage: "length of each calibration sequence", Value: 512},
			&cli.Uint64Flag{Name: "seed", Usage: "seed that picks the calibration sequences", Value: 42},
			&cli.StringFlag{Name: "format", Usage: "deepseek-v3-stock or exact, as convert", Value: convert.DefaultFormat},
			&cli.StringFlag{Name: "dtype", Usage: "stored dtype of the conversions: bf16, f16, f32 (default: the source's)"},
			&cli.StringFlag{Name: "data", Usage: "text file to score (required; e.g. wiki.test.raw)"},
			&cli.IntFlag{Name: "ctx", Usage: "window length in tokens", Value: 1024},
			&cli.IntFlag{Name: "max-windows", Usage: "score at most N windows (0 = all)"},
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "results directory (required; created if needed)"},
			&cli.BoolFlag{Name: "force", Usage: "recompute every point and discard results of other settings in -o DIR"},
			&cli.BoolFlag{Name: "keep-checkpoints", Usage: "also write each converted checkpoint to DIR/checkpoints/METHOD-dcN"},
			&cli.StringFlag{Name: "device", Usage: "cpu (cuda: no GPU backend is built yet)", Value: "cpu"},
			&cli.BoolFlag{Name: "json", Usage: "print results.json instead of the table"},
		}, refineFlags()...),
		Action: func(c *cli.Context) error {
			if err := requireFlags(c, "data", "output"); err != nil {
				return err
			}
			budgets := c.IsSet("cache")
			switch {
			case budgets == c.IsSet("dc"):
				return usagef("sweep: give --dc LIST (latent widths) or --cache LIST (cache budgets), one of them")
			case budgets && (c.IsSet("freqfold") || c.IsSet("rope-stride")):
				return usagef("sweep --cache searches the RoPE slots and FreqFold itself; fix them with --dc instead")
			case budgets && strings.Contains(c.String("method"), ","):
				return usagef("sweep --cache searches one method's settings; give one --method")
			}
			switch d := c.String("device"); d {
			case "cpu":
			case "cuda":
				return usagef("--device cuda: this build has no GPU backend yet (no CUDA device or driver support is compiled in); use --device cpu")
			default:
				return usagef("--device %q is not one of cpu, cuda", d)
			}
			if err := checkDType(c); err != nil {
				return err
			}
			if c.Int("ctx") < 2 {
				return usagef("--ctx must be at least 2, got %d", c.Int("ctx"))
			}
			if c.Int("max-windows") < 0 {
				return usagef("--max-windows must not be negative")
			}
			dir, cfg, err := gqaSource(c)
			if err != nil {
				return err
			}
			if err := checkSearchCtx(c, cfg, budgets); err != nil {
				return err
			}
			if max := cfg.MaxPositionEmbeddings; max > 0 && c.Int("ctx") > max {
				return usagef("--ctx %d exceeds the model's max_position_embeddings %d", c.Int("ctx"), max)
			}
			var ranks, caches, ropeDims []int
			maxRank := 1
			if budgets {
				for f := range strings.SplitSeq(c.String("cache"), ",") {
					n, err := parseCache(strings.TrimSpace(f), cfg)
					if err != nil {
						return err
					}
					if slices.Contains(caches, n) {
						return usagef("--cache %q: %d is given twice", c.String("cache"), n)
					}
					caches = append(caches, n)
				}
				if c.IsSet("rope-dim") {
					if ropeDims, err = parseList("rope-dim", c.String("rope-dim")); err != nil {
						return err
					}
				}
			} else {
				if ranks, err = parseRanks(c.String("dc")); err != nil {
					return err
				}
				maxRank = slices.Max(ranks)
			}
			methods, err := sweepMethods(c, cfg, maxRank, !budgets)
			if err != nil {
				return err
			}
			be, err := backendFor(c)
			if err != nil {
				return err
			}
			sc := sweep.Config{
				Model: dir, Ranks: ranks, Budgets: caches, RopeDims: ropeDims, SearchCtx: c.Int("search-ctx"), Methods: methods, DType: c.String("dtype"),
				Data: c.String("data"), Ctx: c.Int("ctx"), MaxWindows: c.Int("max-windows"),
				Dir: c.String("output"), Force: c.Bool("force"), KeepCheckpoints: c.Bool("keep-checkpoints"),
				Backend: be, Version: version,
			}
			if sc.Calibration, err = calibrationFlags(c, "sweeps", cfg); err != nil {
				return err
			}
			if budgets && sc.Calibration == nil {
				return usagef("sweep --cache scores its candidates on held-out calibration text: add --calib FILE")
			}
			if sc.Refine, err = refineOptions(c, sc.Calibration); err != nil {
				return err
			}
			sc.Progress = sweepProgress(c)
			res, err := sweep.Run(c.Context, sc)
			if err != nil {
				return conversionError("sweep", dir, err)
			}
			if c.Bool("json") {
				return writeJSON(c.App.Writer, res)
			}
			md, err := os.ReadFile(filepath.Join(sc.Dir, "results.md"))
			if err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "%s\nresults and plots in %s\n", md, sc.Dir)
			return nil
		},
	})
}

// parseRanks reads --dc's comma-separated widths.
func parseRanks(s string) ([]int, error) { return parseList("dc", s) }

// parseList reads flag's comma-separated positive numbers.
func parseList(flag, s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, usagef("--%s %q: want positive numbers separated by commas, e.g. 64,128,256", flag, s)
		}
		if slices.Contains(out, n) {
			return nil, usagef("--%s %q: %d is given twice", flag, s, n)
		}
		out = append(out, n)
	}
	return out, nil
}

// sweepMethods builds --method's methods on the shared conversion flags
// and, when validate (a --dc sweep), validates each at the largest width.
func sweepMethods(c *cli.Context, cfg model.Config, maxRank int, validate bool) ([]sweep.Method, error) {
	base := convert.DefaultOptions(cfg, maxRank)
	if c.IsSet("rope-dim") && validate {
		n, err := strconv.Atoi(c.String("rope-dim"))
		if err != nil {
			return nil, usagef("--rope-dim %q: want one even number with --dc", c.String("rope-dim"))
		}
		base.RopeDim = n
	}
	var err error
	if base.RopeStride, err = parseRopeStride(c.String("rope-stride")); err != nil {
		return nil, err
	}
	base.NopeSpan = c.Float64("nope-span")
	base.ValueWeight = c.Float64("value-weight")
	base.Format = c.String("format")
	if !(base.ValueWeight > 0) {
		return nil, usagef("--value-weight must be positive, got %v", base.ValueWeight)
	}
	freqFold, err := parseFreqFold(c.String("freqfold"))
	if err != nil {
		return nil, err
	}
	var methods []sweep.Method
	for spec := range strings.SplitSeq(c.String("method"), ",") {
		o := base
		for part := range strings.SplitSeq(strings.TrimSpace(spec), "+") {
			switch {
			case slices.Contains(rope.Methods(), part):
				o.RopeMethod = part
			case slices.Contains(convert.Weightings(), part):
				o.Weighting = part
			default:
				return nil, usagef("--method %q: %q is neither a rope-select (%s) nor a weighting (%s)", spec, part, strings.Join(rope.Methods(), ", "), strings.Join(convert.Weightings(), ", "))
			}
		}
		o.FreqFold = freqFold
		if freqFold == 0 && o.RopeMethod == rope.MethodRoRoPE {
			o.FreqFold = convert.AutoFreqFold(cfg, o.RopeDim, o.RopeStride)
		}
		if !validate && o.RopeMethod != rope.MethodRoRoPE {
			return nil, usagef("sweep --cache searches RoRoPE's slots: --method %s is not rorope", spec)
		}
		if validate {
			if err := o.Validate(cfg); err != nil {
				return nil, usageError{fmt.Errorf("--method %s: %w", spec, err)}
			}
		}
		name := o.RopeMethod + "+" + o.Weighting
		if slices.ContainsFunc(methods, func(m sweep.Method) bool { return m.Name == name }) {
			return nil, usagef("--method: %s is given twice", name)
		}
		methods = append(methods, sweep.Method{Name: name, Options: o})
	}
	return methods, nil
}

// sweepProgress shows a bar for the current step, labelled with the
// step's place in the sweep, and prints a line for each finished point.
func sweepProgress(c *cli.Context) func(sweep.Event) {
	w := c.App.ErrWriter
	var bar *progress
	var step sweep.Event // the step the bar shows
	return func(ev sweep.Event) {
		if ev.Finished != nil {
			if bar != nil {
				bar.Done()
				bar = nil
			}
			r := ev.Finished
			dc := "original"
			if r.Method != "original" {
				dc = fmt.Sprintf("%s dc %d", r.Method, r.DC)
			}
			fmt.Fprintf(w, "[%d/%d] %s: ppl %.4f (%+.2f%%), cache %.1f%% of original, %.1f s\n",
				ev.Step, ev.Steps, dc, r.PPL, r.DeltaPPLPercent, r.CachePercent, r.ConvertSeconds+r.EvalSeconds)
			return
		}
		if bar == nil || ev.Step != step.Step || ev.What != step.What {
			if bar != nil {
				bar.Done()
			}
			step = ev
			bar = newProgress(w, ev.Total, fmt.Sprintf("[%d/%d] %s", ev.Step, ev.Steps, ev.What))
		}
		bar.Set(ev.Done, ev.Total)
	}
}
