package main

import (
	"encoding/json"
	"errors"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/safetensors"
)

func calibFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "calib.txt")
	if err := os.WriteFile(p, []byte(strings.Repeat(demoText, 3)), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConvertThenEval(t *testing.T) {
	dir := synthetic(t)
	out := filepath.Join(t.TempDir(), "mla")
	stdout, stderr, code := run(t, "convert", dir, "--dc", "32", "-o", out, "--calib", calibFile(t), "--calib-tokens", "512", "--calib-seq", "128", "--json")
	if code != 0 {
		t.Fatalf("convert exit %d: %s", code, stderr)
	}
	var rep convertReport
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("convert --json: %v\n%s", err, stdout)
	}
	// Synthetic: 4 layers, 2 KV heads × 32; d_r = min(64, 32).
	if rep.CacheValuesBefore != 4*2*2*32 || rep.CacheValuesAfter != 4*(32+32) || rep.Rank != 32 || rep.RopeDim != 32 {
		t.Errorf("cache %d → %d values, rank %d, rope %d; want %d → %d, 32, 32", rep.CacheValuesBefore, rep.CacheValuesAfter, rep.Rank, rep.RopeDim, 512, 256)
	}
	if math.Abs(rep.Reduction-0.5) > 1e-12 {
		t.Errorf("reduction %v, want 0.5", rep.Reduction)
	}
	stdout, stderr, code = run(t, "eval", out, "--data", calibFile(t), "--ctx", "64", "--json")
	if code != 0 {
		t.Fatalf("eval of the converted model exit %d: %s", code, stderr)
	}
	var ev evalReport
	if err := json.Unmarshal([]byte(stdout), &ev); err != nil {
		t.Fatal(err)
	}
	if ev.Architecture != "DeepseekV3ForCausalLM" || ev.KVCacheValuesPerToken != 4*64 || !(ev.PPL > 1) {
		t.Errorf("eval: %s, %d cache values, ppl %v", ev.Architecture, ev.KVCacheValuesPerToken, ev.PPL)
	}
	stdout, stderr, code = run(t, "inspect", out)
	if code != 0 || !strings.Contains(stdout, "kv_lora_rank 32") {
		t.Errorf("inspect of the converted model exit %d: %s%s", code, stdout, stderr)
	}
	// The table, without --json.
	stdout, stderr, code = run(t, "convert", dir, "--dc", "64", "-o", out, "--force", "--format", "deepseek-v3-stock")
	if code != 0 || !strings.Contains(stdout, "reduction") || !strings.Contains(stdout, "25.0%") {
		t.Errorf("convert table exit %d:\n%s%s", code, stdout, stderr)
	}
}

func TestConvertBadInput(t *testing.T) {
	dir := synthetic(t)
	mla := filepath.Join(t.TempDir(), "mla")
	if _, stderr, code := run(t, "convert", dir, "--dc", "32", "-o", mla); code != 0 {
		t.Fatalf("convert: %s", stderr)
	}
	nan := synthetic(t)
	m, err := model.Load(t.Context(), nan, nil)
	if err != nil {
		t.Fatal(err)
	}
	m.Layers[2].K.W[5] = float32(math.Inf(1))
	specs, err := m.Tensors(safetensors.BF16)
	if err != nil {
		t.Fatal(err)
	}
	if err := safetensors.WriteCheckpoint(t.Context(), nan, specs, safetensors.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	calib := calibFile(t)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"dc above the lossless bound", []string{"convert", dir, "--dc", "97"}, exitUsage, "above the lossless bound 2·n_kv·d_h − d_r = 96"},
		{"odd rope dim", []string{"convert", dir, "--dc", "32", "--rope-dim", "7"}, exitUsage, "--rope-dim 7 must be a positive even number"},
		{"rope dim above head_dim", []string{"convert", dir, "--dc", "32", "--rope-dim", "64"}, exitUsage, "--rope-dim 64 exceeds head_dim 32"},
		{"bad freqfold", []string{"convert", dir, "--dc", "32", "--freqfold", "3"}, exitUsage, "--freqfold 3"},
		{"stride no band holds", []string{"convert", dir, "--dc", "32", "--rope-dim", "8", "--rope-stride", "1.5"}, exitUsage, "must be a multiple of the rope stride 1.5"},
		{"more slots per band than KV heads", []string{"convert", dir, "--dc", "32", "--rope-dim", "8", "--rope-stride", "1/4"}, exitUsage, "use a stride of at least 0.5"},
		{"bad rope stride", []string{"convert", dir, "--dc", "32", "--rope-stride", "1/0"}, exitUsage, "--rope-stride 1/0"},
		{"zero freqfold", []string{"convert", dir, "--dc", "32", "--freqfold", "0"}, exitUsage, "--freqfold 0"},
		{"unknown dtype", []string{"convert", dir, "--dc", "32", "--dtype", "f8"}, exitUsage, `--dtype "f8"`},
		{"calibration sequence too short", []string{"convert", dir, "--dc", "32", "--calib", calib, "--calib-seq", "1"}, exitUsage, "--calib-seq 1"},
		{"calibration shorter than a sequence", []string{"convert", dir, "--dc", "32", "--calib", calib, "--calib-tokens", "100", "--calib-seq", "128"}, exitUsage, "--calib-tokens 100"},
		{"calibration beyond any memory", []string{"convert", dir, "--dc", "32", "--calib", calib, "--calib-tokens", "9000000000000000000"}, exitUsage, "exceeds the limit"},
		{"missing dc", []string{"convert", dir}, exitUsage, "--dc"},
		{"both cache and dc", []string{"convert", dir, "--dc", "32", "--cache", "64", "--calib", calib}, exitUsage, "not both"},
		{"cache without calibration", []string{"convert", dir, "--cache", "64"}, exitUsage, "add --calib FILE"},
		{"cache with a fixed freqfold", []string{"convert", dir, "--cache", "64", "--calib", calib, "--freqfold", "2"}, exitUsage, "chooses the RoPE slots"},
		{"refine without calibration", []string{"convert", dir, "--dc", "32", "--refine"}, exitUsage, "--refine fits each layer on calibration sequences"},
		{"refine option without refine", []string{"convert", dir, "--dc", "32", "--calib", calib, "--refine-steps", "5"}, exitUsage, "--refine-steps applies with --refine only"},
		{"refine inputs unknown", []string{"convert", dir, "--dc", "32", "--calib", calib, "--refine", "--refine-inputs", "both"}, exitUsage, `refine inputs "both"`},
		{"refine tokens above calibration", []string{"convert", dir, "--dc", "32", "--calib", calib, "--refine", "--refine-tokens", "99999999"}, exitUsage, "--refine-tokens 99999999"},
		{"refine with too few sequences", []string{"convert", dir, "--dc", "32", "--calib", calib, "--calib-tokens", "2048", "--refine"}, exitUsage, "held back"},
		{"refine zero steps", []string{"convert", dir, "--dc", "32", "--calib", calib, "--refine", "--refine-steps", "0"}, exitUsage, "must be positive"},
		{"refine corrective teacher", []string{"convert", dir, "--dc", "32", "--calib", calib, "--refine", "--refine-inputs", "teacher", "--refine-correct"}, exitUsage, "corrective targets need sequential inputs"},
		{"cache of zero", []string{"convert", dir, "--cache", "0", "--calib", calib}, exitUsage, `--cache "0"`},
		{"cache above 100%", []string{"convert", dir, "--cache", "150%", "--calib", calib}, exitUsage, "percentage in (0, 100]"},
		{"cache that fits nothing", []string{"convert", dir, "--cache", "6", "--calib", calib}, exitUsage, "no split of a cache of 6 values per token and layer fits"},
		{"cache no split of which the target loads", []string{"convert", dir, "--cache", "48", "--calib", calib, "--target", "vllm-cpu"}, exitUsage, "--target vllm-cpu (vLLM 0.32 CPU, CPU_MLA backend) loads: kv_lora_rank + qk_rope_head_dim must be one of [576], qk_rope_head_dim one of [64]"},
		{"calibration longer than the trained context", []string{"convert", dir, "--dc", "32", "--calib", calib, "--calib-seq", "4096"}, exitUsage, "exceeds the model's max_position_embeddings 2048"},
		{"already MLA", []string{"convert", mla, "--dc", "32"}, exitError, "already MLA"},
		{"non-finite weights", []string{"convert", nan, "--dc", "32"}, exitError, "non-finite"},
		{"unreadable calibration file", []string{"convert", dir, "--dc", "32", "--calib", filepath.Join(dir, "absent.txt")}, exitError, "calibration file"},
		{"existing output", []string{"convert", dir, "--dc", "32", "-o", mla}, exitError, "pass --force"},
		{"existing output of a search", []string{"convert", dir, "--cache", "64", "--calib", calib, "-o", mla}, exitError, "pass --force"},
		{"output inside the source, search", []string{"convert", dir, "--cache", "64", "--calib", calib, "-o", filepath.Join(dir, "out")}, exitError, "lies inside the source"},
		{"search-ctx without a search", []string{"convert", dir, "--dc", "32", "--search-ctx", "64"}, exitUsage, "--search-ctx"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parent := t.TempDir()
			out := filepath.Join(parent, "out")
			args := tc.args
			if !strings.Contains(strings.Join(args, " "), " -o ") {
				args = append(args, "-o", out)
			}
			_, stderr, code := run(t, args...)
			if code != tc.code || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", code, stderr, tc.code, tc.want)
			}
			if strings.Count(strings.TrimSpace(stderr), "\n") > 0 && !strings.Contains(stderr, "Incorrect Usage") {
				t.Errorf("error is not one line: %q", stderr)
			}
			if _, err := os.Stat(out); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s was written", out)
			}
			if entries, _ := os.ReadDir(parent); len(entries) != 0 {
				t.Errorf("left behind: %v", entries)
			}
		})
	}
}

// convert never deletes an input that the output would replace: a
// calibration file inside the output directory is refused, with --force
// too, and the directory is left as it was.
func TestConvertKeepsTheCalibrationFile(t *testing.T) {
	dir := synthetic(t)
	out := filepath.Join(t.TempDir(), "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	calib := filepath.Join(out, "calib.txt")
	if err := os.WriteFile(calib, []byte(strings.Repeat(demoText, 3)), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"--dc", "32"},
		{"--cache", "64"},
	} {
		_, stderr, code := run(t, append([]string{"convert", dir, "-o", out, "--force", "--calib", calib}, args...)...)
		if code != exitError || !strings.Contains(stderr, "holds the calibration file") {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and the calibration file named", args, code, stderr, exitError)
		}
		if b, err := os.ReadFile(calib); err != nil || string(b) != strings.Repeat(demoText, 3) {
			t.Fatalf("%v: the calibration file is gone or changed (%v)", args, err)
		}
	}
}

// The default (stock) format cannot be stored as f16: an f16 source
// converted with the defaults is a usage error naming both ways out.
func TestConvertF16SourceStockFormat(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "f16")
	if _, stderr, code := run(t, "synth", "-o", dir, "--dtype", "f16"); code != 0 {
		t.Fatalf("synth: %s", stderr)
	}
	out := filepath.Join(t.TempDir(), "out")
	_, stderr, code := run(t, "convert", dir, "--dc", "32", "-o", out)
	if code != exitUsage || !strings.Contains(stderr, "--dtype bf16 or f32, or --format exact") {
		t.Errorf("exit %d, stderr %q; want exit %d naming --dtype and --format exact", code, stderr, exitUsage)
	}
	if _, stderr, code := run(t, "convert", dir, "--dc", "32", "-o", out, "--format", "exact"); code != 0 {
		t.Errorf("--format exact of an f16 source: exit %d: %s", code, stderr)
	}
}

// convert --cache searches on held-out calibration text and writes the
// best candidate: the report lists every candidate scored, one best, and
// the written shape fills the budget (50% of the synthetic 2·2·32).
func TestConvertCacheSearch(t *testing.T) {
	if testing.Short() {
		t.Skip("scores a dozen conversions (-short)")
	}
	dir := synthetic(t)
	out := filepath.Join(t.TempDir(), "mla")
	stdout, stderr, code := run(t, "convert", dir, "--cache", "50%", "--calib", calibFile(t), "--calib-tokens", "1024", "--calib-seq", "64", "-o", out, "--json")
	if code != 0 {
		t.Fatalf("convert --cache exit %d: %s", code, stderr)
	}
	var rep convertReport
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Search == nil || len(rep.Search.Budgets) != 1 || rep.Search.Budgets[0].Cache != 64 {
		t.Fatalf("search report %+v", rep.Search)
	}
	b := rep.Search.Budgets[0]
	best := 0
	for _, c := range b.Candidates {
		if c.Best {
			best++
			if c.Rank != rep.Rank || c.RopeDim != rep.RopeDim {
				t.Errorf("best candidate %+v, written kv_lora_rank %d + qk_rope_head_dim %d", c, rep.Rank, rep.RopeDim)
			}
		}
	}
	if best != 1 || len(b.Candidates) < 3 || rep.Rank+rep.RopeDim > 64 {
		t.Errorf("%d best of %d candidates; wrote %d + %d", best, len(b.Candidates), rep.Rank, rep.RopeDim)
	}
	if !strings.Contains(rep.Method, "nope_fix(attention_profile)") {
		t.Errorf("method %q", rep.Method)
	}
	stdout, stderr, code = run(t, "convert", dir, "--cache", "64", "--rope-dim", "16", "--calib", calibFile(t), "--calib-tokens", "1024", "--calib-seq", "64", "-o", out, "--force")
	if code != 0 || !strings.Contains(stdout, "← best") || !strings.Contains(stdout, "qk_rope_head_dim 16") {
		t.Errorf("convert --cache --rope-dim exit %d:\n%s%s", code, stdout, stderr)
	}
}
