package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// bench on the synthetic checkpoint and its conversion: every result row
// is there with the documented fields, caches are what the shapes say, and
// the ratios compare the second model with the first.
func TestBenchJSON(t *testing.T) {
	src := synthetic(t)
	dst := filepath.Join(t.TempDir(), "mla")
	if _, stderr, code := run(t, "convert", src, "--dc", "32", "-o", dst); code != 0 {
		t.Fatalf("convert exit %d: %s", code, stderr)
	}
	// bench feeds token ids of its own: a checkpoint without a tokenizer
	// is benchmarked all the same.
	if err := os.Remove(filepath.Join(dst, "tokenizer.json")); err != nil {
		t.Fatal(err)
	}
	out, stderr, code := run(t, "bench", src, dst, "--ctx", "0,256,300", "--batch", "2", "--decode-tokens", "3", "--prefill-chunk", "128", "--json")
	if code != 0 {
		t.Fatalf("bench exit %d: %s", code, stderr)
	}
	var rep struct {
		Results []map[string]any `json:"results"`
		Ratios  []map[string]any `json:"ratios"`
		Copy    float64          `json:"copy_bytes_per_second"`
		RSS     float64          `json:"peak_rss_bytes"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v:\n%s", err, out)
	}
	if len(rep.Results) != 6 || len(rep.Ratios) != 3 || !(rep.Copy > 0) || !(rep.RSS > 0) {
		t.Fatalf("%d results, %d ratios, copy %v, peak RSS %v:\n%s", len(rep.Results), len(rep.Ratios), rep.Copy, rep.RSS, out)
	}
	// Synthetic: 4 layers, 2 KV heads × 32, bf16. GQA rows 2·2·32 values,
	// MLA rows 32 + 32 (d_r = head_dim), two sequences of ctx+3 positions
	// in pages of 128.
	pages := func(n int) float64 { return float64((n + 127) / 128 * 128) }
	for i, r := range rep.Results {
		for _, k := range []string{"model", "ctx", "batch", "decode_tokens_per_second", "prefill_tokens_per_second", "kv_cache_bytes_allocated",
			"weight_bytes_per_step", "weight_bytes_per_second", "weight_fraction_of_copy_bandwidth", "weight_dtype"} {
			if _, ok := r[k]; !ok {
				t.Errorf("result %d lacks %q", i, k)
			}
		}
		ctx := r["ctx"].(float64)
		values := 128.0
		if i%2 == 1 {
			values = 64
		}
		if want := 2 * pages(int(ctx)+3) * values * 4 * 2; r["kv_cache_bytes_allocated"].(float64) != want {
			t.Errorf("result %d: %v bytes allocated, want %v", i, r["kv_cache_bytes_allocated"], want)
		}
		// At ctx 0 there is no prefill; decoding reads the weights always.
		if !(r["decode_tokens_per_second"].(float64) > 0) || (ctx > 0) != (r["prefill_tokens_per_second"].(float64) > 0) ||
			!(r["weight_bytes_per_second"].(float64) > 0) {
			t.Errorf("result %d: speeds %v", i, r)
		}
		// The synthetic checkpoint's matrices stay bf16: 4 layers of q, k,
		// v, o, gate, up, down and the LM head, two bytes per weight.
		if i%2 == 0 {
			const D, I, kv, V = 256, 688, 64, 257
			want := 2.0 * (4*(2*D*D+2*kv*D+3*I*D) + V*D)
			if got := r["weight_bytes_per_step"].(float64); got != want || r["weight_dtype"] != "bf16" {
				t.Errorf("result %d: %v weight bytes per step of %v, want %v of bf16", i, got, r["weight_dtype"], want)
			}
		}
	}
	if got := rep.Ratios[1]["cache_bytes_ratio"].(float64); got != 0.5 {
		t.Errorf("cache ratio %v, want 0.5", got)
	}
	for _, bad := range []string{"-1", "x", "1,,2"} {
		if _, stderr, code := run(t, "bench", src, "--ctx", bad); code != exitUsage || !strings.Contains(stderr, "--ctx") {
			t.Errorf("bad --ctx %s: exit %d, %s", bad, code, stderr)
		}
	}
}
