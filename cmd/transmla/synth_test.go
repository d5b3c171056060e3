package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// --shape llama3-8b takes Llama-3-8B's config (vocabulary, RoPE base,
// positions) with explicit size flags overriding its sizes; an unknown
// shape is a usage error.
func TestSynthShapes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "m")
	if _, stderr, code := run(t, "synth", "--shape", "llama3-8b", "--layers", "1", "--hidden", "64", "--heads", "4",
		"--kv-heads", "2", "--head-dim", "16", "--intermediate", "96", "-o", dir); code != 0 {
		t.Fatalf("synth failed (%d): %s", code, stderr)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Layers    int     `json:"num_hidden_layers"`
		Hidden    int     `json:"hidden_size"`
		Vocab     int     `json:"vocab_size"`
		RopeTheta float64 `json:"rope_theta"`
		MaxPos    int     `json:"max_position_embeddings"`
	}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Layers != 1 || cfg.Hidden != 64 || cfg.Vocab != 128256 || cfg.RopeTheta != 500000 || cfg.MaxPos != 8192 {
		t.Errorf("config %+v: want 1 layer, hidden 64, and Llama-3-8B's vocabulary 128256, rope_theta 500000, 8192 positions", cfg)
	}
	if _, _, code := run(t, "synth", "--shape", "llama4", "-o", filepath.Join(t.TempDir(), "x")); code != exitUsage {
		t.Errorf("unknown shape: exit %d, want %d", code, exitUsage)
	}
}
