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
