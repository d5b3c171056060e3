package main

import (
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/convert"
	"github.com/transmla/transmla/rope"
)

// convertReport is the --json output of convert.
type convertReport struct {
	*convert.Summary
	PeakRSSBytes int64  `json:"peak_rss_bytes"`
	Backend      string `json:"backend"`
}

func convertCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:      "convert",
		Usage:     "rewrite a GQA checkpoint as MLA (DeepSeek-V3 layout) with a --dc-wide latent KV cache",
		ArgsUsage: "MODEL",
		Description: `Moves RoPE into a decoupled key of --rope-dim dims shared by all heads, factors
the position-free keys and the values into one latent of --dc dims, folds the rest
into q_proj and kv_b_proj, and writes a DeepSeek-V3 checkpoint to -o DIR. The KV
cache per token and layer becomes dc + rope-dim values instead of 2·n_kv·head_dim.

With --calib FILE the factorizations use activation statistics of the model on that
text (never calibrate on the evaluation text); without it they use the weights only.
Layers are read, calibrated, converted and written one at a time. The output
directory appears only when complete; MODEL is never modified.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "directory to create (required)"},
			&cli.BoolFlag{Name: "force", Usage: "replace -o DIR if it exists (only once the new one is complete)"},
			&cli.IntFlag{Name: "dc", Usage: "latent width kv_lora_rank; at most 2·n_kv·head_dim − rope-dim", DefaultText: "none, required"},
			&cli.IntFlag{Name: "rope-dim", Usage: "decoupled RoPE key width qk_rope_head_dim: even, dividing head_dim", DefaultText: "64, or the largest such divisor below it"},
			&cli.StringFlag{Name: "rope-select", Usage: "which key dims keep RoPE: rorope (PCA across KV heads), or per-head pairs 2norm, high, uniform", Value: rope.MethodRoRoPE},
			&cli.StringFlag{Name: "freqfold", Usage: "rorope: adjacent frequencies rotated together, a multiple of head_dim/rope-dim, or auto", Value: "auto"},
			&cli.Float64Flag{Name: "nope-span", Usage: "damp each de-rotated key component by its mean cos(ωΔ) over distances 0..N (0 = off)", Value: convert.DefaultNopeSpan},
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
		},
		Action: func(c *cli.Context) error {
			if err := requireFlags(c, "output", "dc"); err != nil {
				return err
			}
			dir, cfg, err := gqaSource(c)
			if err != nil {
				return err
			}
			opts := convert.DefaultOptions(cfg, c.Int("dc"))
			if c.IsSet("rope-dim") {
				opts.RopeDim = c.Int("rope-dim")
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
			cal, err := calibrationFlags(c, "conversions")
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
				opts.FreqFold = convert.AutoFreqFold(cfg.HeadDim, opts.RopeDim)
			}
			if err := opts.Validate(cfg); err != nil {
				return usageError{err}
			}
			be, err := backendFor(c)
			if err != nil {
				return err
			}
			job := convert.Job{
				Source: dir, Output: c.String("output"), Force: c.Bool("force"),
				Options: opts, DType: c.String("dtype"), Calibration: cal, Backend: be, Version: version,
			}
			stages := []string{convert.StageCalibrate, convert.StageConvert, convert.StageWrite}
			bar := newProgress(c.App.ErrWriter, cfg.NumLayers*len(stages), "converting")
			job.Progress = func(ev convert.Event) {
				for i, s := range stages {
					if s == ev.Stage {
						bar.Set(ev.Layer*len(stages)+i, ev.Layers*len(stages))
					}
				}
			}
			sum, err := convert.Run(c.Context, job)
			bar.Done()
			if err != nil {
				return fmt.Errorf("convert %s: %w", dir, err)
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
