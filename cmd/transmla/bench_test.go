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
	out, stderr, code := run(t, "bench", src, dst, "--ctx", "256,300", "--batch", "2", "--decode-tokens", "3", "--prefill-chunk", "128", "--json")
	if code != 0 {
		t.Fatalf("bench exit %d: %s", code, stderr)
	}
	var rep struct {
		Results []map[string]any `json:"results"`
		Ratios  []map[string]any `json:"ratios"`
		Copy    float64          `json:"copy_bytes_per_second"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v:\n%s", err, out)
	}
	if len(rep.Results) != 4 || len(rep.Ratios) != 2 || !(rep.Copy > 0) {
		t.Fatalf("%d results, %d ratios, copy %v:\n%s", len(rep.Results), len(rep.Ratios), rep.Copy, out)
	}
	// Synthetic: 4 layers, 2 KV heads × 32, bf16. GQA rows 2·2·32 values,
	// MLA rows 32 + 32 (d_r = head_dim), two sequences of ctx+3 positions
	// in pages of 128.
	pages := func(n int) float64 { return float64((n + 127) / 128 * 128) }
	for i, r := range rep.Results {
		for _, k := range []string{"model", "ctx", "batch", "decode_tokens_per_second", "prefill_tokens_per_second", "kv_cache_bytes_allocated"} {
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
		if !(r["decode_tokens_per_second"].(float64) > 0) || !(r["prefill_tokens_per_second"].(float64) > 0) {
			t.Errorf("result %d: speeds %v", i, r)
		}
	}
	if got := rep.Ratios[0]["cache_bytes_ratio"].(float64); got != 0.5 {
		t.Errorf("cache ratio %v, want 0.5", got)
	}
	if _, stderr, code := run(t, "bench", src, "--ctx", "1"); code != exitUsage || !strings.Contains(stderr, "--ctx") {
		t.Errorf("bad --ctx: exit %d, %s", code, stderr)
	}
}
