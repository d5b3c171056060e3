package main

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/convert"
	"github.com/transmla/transmla/model"
)

// The conversion flags that convert and sweep share are read here, so
// that both give them one meaning and refuse bad values as usage errors
// (exit 2) before any work.

// parseFreqFold reads --freqfold: a positive number, or auto (returned as
// 0, which the caller resolves for the method).
func parseFreqFold(s string) (int, error) {
	if s == "auto" {
		return 0, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return 0, usagef("--freqfold %s: want a positive number or auto", s)
	}
	return n, nil
}

// parseRopeStride reads --rope-stride: a positive number, as a decimal
// or a fraction (1/2, 1/4); empty is the default, head_dim/rope-dim
// (returned as 0).
func parseRopeStride(s string) (float64, error) {
	if s == "" {
		return 0, nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if num, den, ok := strings.Cut(s, "/"); ok {
		n, errN := strconv.ParseFloat(num, 64)
		d, errD := strconv.ParseFloat(den, 64)
		v, err = n/d, errors.Join(errN, errD)
	}
	if err != nil || !(v > 0) || math.IsInf(v, 0) {
		return 0, usagef("--rope-stride %s: want a positive number, e.g. 2, 1, 0.5 or 1/2", s)
	}
	return v, nil
}

// checkSearchCtx refuses a --search-ctx without a --cache search (search
// false), or outside [2, max_position_embeddings].
func checkSearchCtx(c *cli.Context, cfg model.Config, search bool) error {
	if !c.IsSet("search-ctx") {
		return nil
	}
	if !search {
		return usagef("--search-ctx sizes the held-out windows of a --cache search; with --dc there is none")
	}
	if n := c.Int("search-ctx"); n < 2 || (cfg.MaxPositionEmbeddings > 0 && n > cfg.MaxPositionEmbeddings) {
		return usagef("--search-ctx %d must be in [2, max_position_embeddings %d]", n, cfg.MaxPositionEmbeddings)
	}
	return nil
}

// checkDType refuses a --dtype that the export cannot write.
func checkDType(c *cli.Context) error {
	if d := c.String("dtype"); d != "" && !slices.Contains([]string{"bf16", "f16", "f32"}, d) {
		return usagef("--dtype %q is not one of bf16, f16, f32", d)
	}
	return nil
}

// calibrationFlags reads --calib and its sizes; nil means data-free.
// what names the runs ("conversions", "sweeps") in the message about
// size flags given without --calib.
//
// Sequences longer than the model's max_position_embeddings would
// calibrate on positions it never trained on: the default --calib-seq is
// capped there (with a note on stderr), a longer explicit one refused.
func calibrationFlags(c *cli.Context, what string, cfg model.Config) (*convert.Calibration, error) {
	file := c.String("calib")
	if file == "" {
		for _, f := range []string{"calib-tokens", "calib-seq", "seed"} {
			if c.IsSet(f) {
				return nil, usagef("--%s applies to calibrated %s only: add --calib FILE", f, what)
			}
		}
		return nil, nil
	}
	cal := &convert.Calibration{File: file, Tokens: c.Int("calib-tokens"), SeqLen: c.Int("calib-seq"), Seed: c.Uint64("seed")}
	if m := cfg.MaxPositionEmbeddings; m > 0 && cal.SeqLen > m {
		if c.IsSet("calib-seq") {
			return nil, usagef("--calib-seq %d exceeds the model's max_position_embeddings %d", cal.SeqLen, m)
		}
		fmt.Fprintf(c.App.ErrWriter, "note: --calib-seq %d capped at the model's max_position_embeddings %d\n", cal.SeqLen, m)
		cal.SeqLen = m
	}
	if cal.SeqLen < 2 {
		return nil, usagef("--calib-seq %d must be at least 2", cal.SeqLen)
	}
	if cal.Tokens < cal.SeqLen {
		return nil, usagef("--calib-tokens %d is less than one sequence of --calib-seq %d", cal.Tokens, cal.SeqLen)
	}
	if cal.Tokens > convert.MaxCalibrationTokens {
		return nil, usagef("--calib-tokens %d exceeds the limit of %d", cal.Tokens, convert.MaxCalibrationTokens)
	}
	return cal, nil
}

// refineFlags are the flags of --refine, shared by convert and sweep.
func refineFlags() []cli.Flag {
	d := convert.DefaultRefine()
	return []cli.Flag{
		&cli.BoolFlag{Name: "refine", Usage: "fit each converted layer's MLA projections to the source layer's attention output on the calibration sequences (needs --calib; minutes per layer)"},
		&cli.IntFlag{Name: "refine-steps", Usage: "--refine: the most Adam steps per layer (it stops early when the held-back sequences stop improving)", Value: d.Steps},
		&cli.IntFlag{Name: "refine-tokens", Usage: "--refine: calibration tokens fitted on, the last " + fmt.Sprint(d.Val) + " sequences held back", DefaultText: "all of --calib-tokens"},
		&cli.IntFlag{Name: "refine-batch", Usage: "--refine: calibration sequences per step", Value: d.Batch},
		&cli.Float64Flag{Name: "refine-lr", Usage: "--refine: peak step relative to each tensor's RMS", Value: d.LR},
		&cli.StringFlag{Name: "refine-inputs", Usage: "--refine: fit each layer on the hidden states of the model refined so far (" + convert.InputsSequential + ", so it also corrects the error from below) or of the source (" + convert.InputsTeacher + ")", Value: d.Inputs},
		&cli.BoolFlag{Name: "refine-o", Usage: "--refine: also fit o_proj"},
		&cli.BoolFlag{Name: "refine-correct", Usage: "--refine with sequential inputs: fit each layer to restore the source's hidden state after it (its attention target plus the error arriving from below)", Value: d.Correct},
		&cli.BoolFlag{Name: "refine-values", Usage: "--refine: first refit kv_b_proj's value half in closed form (least squares with the attention held), kept where the held-back sequences score better", Value: d.Values},
	}
}

// refineOptions reads the --refine flags: nil without --refine.
func refineOptions(c *cli.Context, cal *convert.Calibration) (*convert.Refine, error) {
	if !c.Bool("refine") {
		for _, f := range []string{"refine-steps", "refine-tokens", "refine-batch", "refine-lr", "refine-inputs", "refine-o", "refine-values", "refine-correct"} {
			if c.IsSet(f) {
				return nil, usagef("--%s applies with --refine only", f)
			}
		}
		return nil, nil
	}
	if cal == nil {
		return nil, usagef("--refine fits each layer on calibration sequences: add --calib FILE")
	}
	r := convert.DefaultRefine()
	r.Steps, r.Batch, r.LR = c.Int("refine-steps"), c.Int("refine-batch"), c.Float64("refine-lr")
	r.Inputs, r.Output, r.Values, r.Correct, r.Seed = c.String("refine-inputs"), c.Bool("refine-o"), c.Bool("refine-values"), c.Bool("refine-correct"), cal.Seed
	if r.Inputs == convert.InputsTeacher && !c.IsSet("refine-correct") {
		r.Correct = false // corrective targets are a sequential-inputs option
	}
	seqs := cal.Tokens / cal.SeqLen
	if c.IsSet("refine-tokens") {
		t := c.Int("refine-tokens")
		if t < cal.SeqLen || t > cal.Tokens {
			return nil, usagef("--refine-tokens %d: want between one --calib-seq (%d) and --calib-tokens (%d)", t, cal.SeqLen, cal.Tokens)
		}
		r.Seqs = t / cal.SeqLen
		seqs = r.Seqs
	}
	if err := r.Check(seqs); err != nil {
		return nil, usageError{err}
	}
	return &r, nil
}
