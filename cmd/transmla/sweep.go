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

Each point is saved in DIR/points as it completes: running the same command again
skips finished points (Ctrl-C loses only the point in progress). Results of other
settings in DIR are refused; --force discards them and recomputes every point.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dc", Usage: "latent widths kv_lora_rank, comma-separated (required), e.g. 32,64,128,192,256,320,448"},
			&cli.StringFlag{Name: "method", Usage: "comma-separated methods, each ROPE-SELECT+WEIGHTING (either part alone keeps the other's default): rope-select " + strings.Join(rope.Methods(), ", ") + "; weighting " + strings.Join(convert.Weightings(), ", "), Value: rope.MethodRoRoPE + "+" + convert.WeightAttention},
			&cli.IntFlag{Name: "rope-dim", Usage: "decoupled RoPE key width qk_rope_head_dim", DefaultText: "64, or the largest even divisor of head_dim below it"},
			&cli.StringFlag{Name: "freqfold", Usage: "rorope: adjacent frequencies rotated together, or auto", Value: "auto"},
			&cli.Float64Flag{Name: "nope-span", Usage: "damp each de-rotated key component by its mean cos(ωΔ) over distances 0..N (0 = off)", Value: convert.DefaultNopeSpan},
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
		},
		Action: func(c *cli.Context) error {
			if err := requireFlags(c, "dc", "data", "output"); err != nil {
				return err
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
			if max := cfg.MaxPositionEmbeddings; max > 0 && c.Int("ctx") > max {
				return usagef("--ctx %d exceeds the model's max_position_embeddings %d", c.Int("ctx"), max)
			}
			ranks, err := parseRanks(c.String("dc"))
			if err != nil {
				return err
			}
			methods, err := sweepMethods(c, cfg, slices.Max(ranks))
			if err != nil {
				return err
			}
			be, err := backendFor(c)
			if err != nil {
				return err
			}
			sc := sweep.Config{
				Model: dir, Ranks: ranks, Methods: methods, DType: c.String("dtype"),
				Data: c.String("data"), Ctx: c.Int("ctx"), MaxWindows: c.Int("max-windows"),
				Dir: c.String("output"), Force: c.Bool("force"), KeepCheckpoints: c.Bool("keep-checkpoints"),
				Backend: be, Version: version,
			}
			if sc.Calibration, err = calibrationFlags(c, "sweeps"); err != nil {
				return err
			}
			sc.Progress = sweepProgress(c)
			res, err := sweep.Run(c.Context, sc)
			if err != nil {
				return fmt.Errorf("sweep %s: %w", dir, err)
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
func parseRanks(s string) ([]int, error) {
	var ranks []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, usagef("--dc %q: want positive widths separated by commas, e.g. 64,128,256", s)
		}
		if slices.Contains(ranks, n) {
			return nil, usagef("--dc %q: %d is given twice", s, n)
		}
		ranks = append(ranks, n)
	}
	return ranks, nil
}

// sweepMethods builds --method's methods on the shared conversion flags
// and validates each at the largest width.
func sweepMethods(c *cli.Context, cfg model.Config, maxRank int) ([]sweep.Method, error) {
	base := convert.DefaultOptions(cfg, maxRank)
	if c.IsSet("rope-dim") {
		base.RopeDim = c.Int("rope-dim")
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
			o.FreqFold = convert.AutoFreqFold(cfg.HeadDim, o.RopeDim)
		}
		if err := o.Validate(cfg); err != nil {
			return nil, usageError{fmt.Errorf("--method %s: %w", spec, err)}
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
