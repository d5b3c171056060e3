package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/transmla/transmla/sweep"
)

func TestSweepCommand(t *testing.T) {
	dir := synthetic(t)
	out := filepath.Join(t.TempDir(), "sweep")
	calib := calibFile(t)
	args := []string{"sweep", dir, "--dc", "16,32", "--method", "rorope+attention,2norm+none", "--calib", calib,
		"--calib-tokens", "512", "--calib-seq", "128", "--data", calib, "--ctx", "64", "--max-windows", "2", "-o", out}
	stdout, stderr, code := run(t, args...)
	if code != 0 {
		t.Fatalf("sweep exit %d: %s", code, stderr)
	}
	for _, want := range []string{"| method | d_c | cache values/token |", "| original | — | 512 | 100.0 |", "| rorope+attention | 16 | 192 | 37.5 |", "| 2norm+none | 32 | 256 | 50.0 |"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("sweep output lacks %q:\n%s", want, stdout)
		}
	}
	for _, name := range []string{"results.csv", "results.json", "results.md", "ppl_vs_cache.png", "ppl_vs_cache.svg", "spectra-rorope+attention.png", "spectra-2norm+none.svg"} {
		if _, err := os.Stat(filepath.Join(out, name)); err != nil {
			t.Errorf("sweep did not write %s: %v", name, err)
		}
	}
	// Again with --json: nothing left to compute, the same results.
	stdout, stderr, code = run(t, append(args, "--json")...)
	if code != 0 {
		t.Fatalf("sweep --json exit %d: %s", code, stderr)
	}
	var res sweep.Results
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		t.Fatalf("sweep --json: %v\n%s", err, stdout)
	}
	if res.Original == nil || len(res.Points) != 4 || res.Points[0].DC != 16 || res.Points[0].Method != "rorope+attention" {
		t.Errorf("sweep --json: %+v", res)
	}
	// Other settings in the same directory are refused.
	_, stderr, code = run(t, append(args[:len(args)-2:len(args)-2], "--max-windows", "1", "-o", out)...)
	if code != 1 || !strings.Contains(stderr, "--force") {
		t.Errorf("changed settings: exit %d, %s", code, stderr)
	}
}

func TestSweepUsageErrors(t *testing.T) {
	dir := synthetic(t)
	data := calibFile(t)
	out := filepath.Join(t.TempDir(), "sweep")
	base := []string{"sweep", dir, "--data", data, "-o", out}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--dc", "16", "--device", "cuda"}, "no GPU backend"},
		{[]string{"--dc", "16", "--device", "tpu"}, "--device"},
		{[]string{"--dc", "16,x"}, "--dc"},
		{[]string{"--dc", "16,16"}, "twice"},
		{[]string{"--dc", "0"}, "--dc"},
		{[]string{"--dc", "97"}, "lossless bound"}, // 2·2·32 − 32 = 96
		{[]string{"--dc", "16", "--method", "rorope+sideways"}, "neither a rope-select"},
		{[]string{"--dc", "16", "--method", "bkv,rorope+bkv"}, "twice"},
		{[]string{"--dc", "16", "--seed", "3"}, "--calib"},
		{[]string{"--dc", "16", "--dtype", "f8"}, "--dtype"},
		{[]string{"--dc", "16", "--freqfold", "0"}, "--freqfold 0"},
		{[]string{"--dc", "16", "--calib", data, "--calib-seq", "1"}, "--calib-seq 1"},
		{[]string{"--dc", "16", "--calib", data, "--calib-tokens", "100", "--calib-seq", "128"}, "--calib-tokens 100"},
		{[]string{"--dc", "16", "--calib", data, "--calib-tokens", "9000000000000000000"}, "exceeds the limit"},
		{[]string{"--dc", "16", "--ctx", "4096"}, "max_position_embeddings"},
		{[]string{"--data", data}, "give --dc LIST (latent widths) or --cache LIST"},
		{[]string{"--dc", "16", "--cache", "64"}, "one of them"},
		{[]string{"--cache", "64"}, "add --calib FILE"},
		{[]string{"--cache", "64,64", "--calib", data}, "twice"},
		{[]string{"--cache", "64", "--calib", data, "--freqfold", "2"}, "searches the RoPE slots"},
		{[]string{"--cache", "64", "--calib", data, "--method", "2norm"}, "not rorope"},
		{[]string{"--cache", "64", "--calib", data, "--rope-dim", "16,x"}, "--rope-dim"},
		{[]string{"--dc", "16", "--search-ctx", "64"}, "--search-ctx sizes"},
		{[]string{"--cache", "64", "--calib", data, "--search-ctx", "4096"}, "--search-ctx 4096 must be in [2, max_position_embeddings 2048]"},
		{[]string{"--cache", "64", "--calib", data, "--search-ctx", "-3"}, "--search-ctx -3"},
		{[]string{"--cache", "6", "--calib", data}, "no split of a cache of 6 values"},
	} {
		_, stderr, code := run(t, append(base, tc.args...)...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, %q; want exit 2 naming %q", tc.args, code, stderr, tc.want)
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Errorf("a refused sweep created %s", out)
	}
}
