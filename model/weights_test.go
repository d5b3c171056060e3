package model

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/safetensors"
)

func smallSpec() SyntheticSpec {
	s := DefaultSynthetic()
	s.Layers, s.Hidden, s.Intermediate = 2, 64, 96
	s.Heads, s.KVHeads, s.HeadDim = 4, 2, 16
	return s
}

func writeSmall(t *testing.T, spec SyntheticSpec) string {
	t.Helper()
	dir := t.TempDir()
	if err := WriteSynthetic(context.Background(), dir, spec); err != nil {
		t.Fatal(err)
	}
	return dir
}

// rewrite copies dir's checkpoint into a new directory through edit, which
// may change, drop (return false) or keep each tensor, and writes it with opts.
func rewrite(t *testing.T, dir string, opts safetensors.WriteOptions, edit func(name string, data []float32) bool) string {
	t.Helper()
	src, err := safetensors.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var specs []safetensors.TensorSpec
	for _, name := range src.Names() {
		info, _ := src.Info(name)
		data, err := src.Float32(name)
		if err != nil {
			t.Fatal(err)
		}
		if edit != nil && !edit(name, data) {
			continue
		}
		specs = append(specs, safetensors.Float32Tensor(name, info.DType, info.Shape, data))
	}
	out := t.TempDir()
	if err := safetensors.WriteCheckpoint(context.Background(), out, specs, opts); err != nil {
		t.Fatal(err)
	}
	cfg, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(out, "config.json"), cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestLoadSyntheticShapesAndCounts(t *testing.T) {
	spec := smallSpec()
	spec.QKVBias = true
	m, err := Load(context.Background(), writeSmall(t, spec), nil)
	if err != nil {
		t.Fatal(err)
	}
	c := m.Config
	if c.Architecture != "Qwen2ForCausalLM" || !c.QKVBias || c.NumKVHeads != 2 || c.HeadDim != 16 {
		t.Fatalf("config %+v", c)
	}
	l := m.Layers[1]
	if len(l.K.W) != 32*64 || len(l.K.B) != 32 || l.O.B != nil || len(l.Down.W) != 64*96 || len(m.LMHead.W) != 257*64 {
		t.Errorf("layer sizes: K %d, K bias %d, O bias %v, down %d, head %d", len(l.K.W), len(l.K.B), l.O.B, len(l.Down.W), len(m.LMHead.W))
	}
	if m.StorageDType != safetensors.BF16 || m.KVCacheBytesPerToken() != 2*2*16*2*2 {
		t.Errorf("storage %v, KV bytes/token %d", m.StorageDType, m.KVCacheBytesPerToken())
	}
}

func TestLoadShardedEqualsSingleFile(t *testing.T) {
	dir := writeSmall(t, smallSpec())
	sharded := rewrite(t, dir, safetensors.WriteOptions{MaxShardBytes: 40 << 10}, nil)
	if _, err := os.Stat(filepath.Join(sharded, "model.safetensors.index.json")); err != nil {
		t.Fatalf("expected a sharded checkpoint: %v", err)
	}
	a, err := Load(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Load(context.Background(), sharded, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(a.Embed, b.Embed) || !slices.Equal(a.Layers[1].V.W, b.Layers[1].V.W) || !slices.Equal(a.LMHead.W, b.LMHead.W) {
		t.Error("sharded and single-file checkpoints load different weights")
	}
}

func TestLoadErrors(t *testing.T) {
	dir := writeSmall(t, smallSpec())
	const kName = "model.layers.1.self_attn.k_proj.weight"
	for _, tc := range []struct {
		name   string
		mutate func(t *testing.T) string
		want   []string
	}{
		{"missing tensor", func(t *testing.T) string {
			return rewrite(t, dir, safetensors.WriteOptions{}, func(name string, _ []float32) bool { return name != kName })
		}, []string{kName, "is missing"}},
		{"NaN weight", func(t *testing.T) string {
			return rewrite(t, dir, safetensors.WriteOptions{}, func(name string, d []float32) bool {
				if name == kName {
					d[7] = float32(math.NaN())
				}
				return true
			})
		}, []string{kName, "non-finite", "index 7"}},
		{"config disagrees with weights", func(t *testing.T) string {
			out := rewrite(t, dir, safetensors.WriteOptions{}, nil)
			cfg, _ := os.ReadFile(filepath.Join(out, "config.json"))
			cfg = []byte(strings.Replace(string(cfg), `"num_key_value_heads": 2`, `"num_key_value_heads": 4`, 1))
			if err := os.WriteFile(filepath.Join(out, "config.json"), cfg, 0o644); err != nil {
				t.Fatal(err)
			}
			return out
		}, []string{"model.layers.0.self_attn.k_proj.weight", "shape [32 64]", "config.json implies [64 64]"}},
		{"layer count beyond the checkpoint", func(t *testing.T) string {
			out := rewrite(t, dir, safetensors.WriteOptions{}, nil)
			cfg, _ := os.ReadFile(filepath.Join(out, "config.json"))
			cfg = []byte(strings.Replace(string(cfg), `"num_hidden_layers": 2`, `"num_hidden_layers": 1000000000000000`, 1))
			if err := os.WriteFile(filepath.Join(out, "config.json"), cfg, 0o644); err != nil {
				t.Fatal(err)
			}
			return out
		}, []string{"num_hidden_layers 1000000000000000 exceeds"}},
		{"no config", func(t *testing.T) string {
			out := rewrite(t, dir, safetensors.WriteOptions{}, nil)
			os.Remove(filepath.Join(out, "config.json"))
			return out
		}, []string{"config.json"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(context.Background(), tc.mutate(t), nil)
			if err == nil {
				t.Fatal("Load succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}
