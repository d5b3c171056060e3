package model

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
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
	return rewriteSpecs(t, dir, opts, func(info safetensors.TensorInfo, data []float32) (safetensors.TensorSpec, bool) {
		if edit != nil && !edit(info.Name, data) {
			return safetensors.TensorSpec{}, false
		}
		return safetensors.Float32Tensor(info.Name, info.DType, info.Shape, data), true
	})
}

// rewriteSpecs copies dir's checkpoint into a new directory, each tensor
// written as the spec that plan makes of it, or dropped (false).
func rewriteSpecs(t *testing.T, dir string, opts safetensors.WriteOptions, plan func(info safetensors.TensorInfo, data []float32) (safetensors.TensorSpec, bool)) string {
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
		if spec, ok := plan(info, data); ok {
			specs = append(specs, spec)
		}
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

// WriteTensor passes a tensor on: byte for byte when the dtype stays,
// rounded chunk by chunk otherwise, refusing non-finite values with the
// index Load would report, also past the first chunk.
func TestWriteTensor(t *testing.T) {
	spec := smallSpec()
	spec.Vocab = 40000 // an embedding of 2.56M values spans chunks
	base := writeSmall(t, spec)
	const embed = "model.embed_tokens.weight"
	const far = 2_300_000 // a flat index in the second 4 MiB chunk of bf16
	// withEmbed rewrites base with the embedding stored as dt, edited.
	withEmbed := func(t *testing.T, dt safetensors.DType, edit func(d []float32)) string {
		return rewriteSpecs(t, base, safetensors.WriteOptions{}, func(info safetensors.TensorInfo, data []float32) (safetensors.TensorSpec, bool) {
			if info.Name != embed {
				return safetensors.Float32Tensor(info.Name, info.DType, info.Shape, data), true
			}
			if edit != nil {
				edit(data)
			}
			if dt != safetensors.F64 {
				return safetensors.Float32Tensor(info.Name, dt, info.Shape, data), true
			}
			// Float32Tensor cannot store a value beyond float32.
			return safetensors.TensorSpec{Name: info.Name, DType: dt, Shape: info.Shape, Write: func(w io.Writer) error {
				b := make([]byte, 8*len(data))
				for i, v := range data {
					x := float64(v)
					if i == 5 {
						x = 1e300
					}
					binary.LittleEndian.PutUint64(b[8*i:], math.Float64bits(x))
				}
				_, err := w.Write(b)
				return err
			}}, true
		})
	}
	for _, tc := range []struct {
		name     string
		stored   safetensors.DType
		edit     func(d []float32)
		as       safetensors.DType
		wantErr  []string
		sameAsIn bool // the output must be the stored bytes
	}{
		{name: "bf16 as bf16", stored: safetensors.BF16, as: safetensors.BF16, sameAsIn: true},
		{name: "f32 as f32", stored: safetensors.F32, as: safetensors.F32, sameAsIn: true},
		{name: "bf16 as f32", stored: safetensors.BF16, as: safetensors.F32},
		{name: "f32 as bf16", stored: safetensors.F32, as: safetensors.BF16},
		{name: "f32 as f16", stored: safetensors.F32, as: safetensors.F16},
		{name: "NaN kept as bf16", stored: safetensors.BF16, as: safetensors.BF16,
			edit: func(d []float32) { d[far] = float32(math.NaN()) }, wantErr: []string{embed, "non-finite value (NaN) at flat index 2300000"}},
		{name: "-Inf converted to f32", stored: safetensors.BF16, as: safetensors.F32,
			edit: func(d []float32) { d[far+1] = float32(math.Inf(-1)) }, wantErr: []string{embed, "non-finite value (-Inf) at flat index 2300001"}},
		{name: "f64 beyond float32", stored: safetensors.F64, as: safetensors.F32, // 1e300 at index 5
			wantErr: []string{embed, "non-finite value (+Inf) at flat index 5"}},
		{name: "integer target", stored: safetensors.BF16, as: safetensors.I32, wantErr: []string{embed, "not a float dtype"}},
		// Rounded to f16, 1e5 would be written as +Inf, which Load refuses.
		{name: "f32 beyond f16", stored: safetensors.F32, as: safetensors.F16,
			edit: func(d []float32) { d[far] = 1e5 }, wantErr: []string{embed, "100000 at flat index 2300000", "F16"}},
		{name: "f32 beyond bf16", stored: safetensors.F32, as: safetensors.BF16,
			edit: func(d []float32) { d[7] = -math.MaxFloat32 }, wantErr: []string{embed, "at flat index 7", "BF16"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := withEmbed(t, tc.stored, tc.edit)
			r, err := OpenReader(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			var out bytes.Buffer
			err = r.WriteTensor(context.Background(), embed, tc.as, &out)
			if tc.wantErr != nil {
				if err == nil {
					t.Fatal("WriteTensor succeeded")
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q lacks %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			raw, _ := r.Checkpoint().Raw(embed)
			if tc.sameAsIn {
				if !bytes.Equal(out.Bytes(), raw) {
					t.Error("the output is not the stored bytes")
				}
				return
			}
			values, _ := r.Checkpoint().Float32(embed)
			want := make([]byte, len(values)*int(tc.as.Size()))
			safetensors.EncodeFloat32(want, values, tc.as)
			if !bytes.Equal(out.Bytes(), want) {
				t.Errorf("the output is not the stored values rounded to %s", tc.as)
			}
		})
	}
	t.Run("cancelled", func(t *testing.T) {
		r, err := OpenReader(base)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := r.WriteTensor(ctx, embed, safetensors.BF16, io.Discard); !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled context: %v", err)
		}
	})
}

// AttentionLayer reads what Layer reads of the attention and nothing of
// the MLP.
func TestAttentionLayer(t *testing.T) {
	spec := smallSpec()
	spec.QKVBias = true
	r, err := OpenReader(writeSmall(t, spec))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	full, err := r.Layer(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	attn, err := r.AttentionLayer(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range [][2][]float32{
		{attn.AttnNorm, full.AttnNorm}, {attn.Q.W, full.Q.W}, {attn.Q.B, full.Q.B}, {attn.K.W, full.K.W},
		{attn.K.B, full.K.B}, {attn.V.W, full.V.W}, {attn.V.B, full.V.B}, {attn.O.W, full.O.W},
	} {
		if len(p[0]) == 0 || !slices.Equal(p[0], p[1]) {
			t.Fatal("an attention tensor differs from Layer's")
		}
	}
	if attn.MLPNorm != nil || attn.Gate.W != nil || attn.Up.W != nil || attn.Down.W != nil {
		t.Error("AttentionLayer read MLP tensors")
	}
	if _, err := r.AttentionLayer(context.Background(), 2); err == nil {
		t.Error("layer 2 of 2 was read")
	}
}
