package convert

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/transmla/transmla/internal/synthtest"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/safetensors"
)

// The tensors Run passes on from the source (keptTensor) are the ones
// ConvertLayer leaves as they were, in every format, with and without
// biases.
func TestKeptTensorsAreUnchangedByConversion(t *testing.T) {
	for _, tc := range []struct {
		name   string
		bias   bool
		format string
	}{
		{"llama exact", false, FormatExact},
		{"llama stock", false, FormatStock},
		{"qwen2 exact", true, FormatExact},
		{"qwen2 stock", true, FormatStock},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := model.DefaultSynthetic()
			spec.QKVBias = tc.bias
			m, err := model.Load(context.Background(), synthtest.Checkpoint(t, spec), nil)
			if err != nil {
				t.Fatal(err)
			}
			opts := Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightAttention, Rank: 24, Format: tc.format}
			out, _, err := ConvertModel(context.Background(), m, opts, nil)
			if err != nil {
				t.Fatal(err)
			}
			stored := func(cfg model.Config, i int, l *model.Layer, name string) []byte {
				spec, err := model.LayerTensor(cfg, i, l, name, safetensors.F32)
				if err != nil {
					t.Fatal(err)
				}
				var b bytes.Buffer
				if err := spec.Write(&b); err != nil {
					t.Fatal(err)
				}
				return b.Bytes()
			}
			var kept, replaced []string
			for i := range out.Layers {
				for _, ts := range model.LayerTensorShapes(out.Config, i) {
					if !keptTensor(ts.Name) {
						replaced = append(replaced, ts.Name)
						continue
					}
					kept = append(kept, ts.Name)
					if !bytes.Equal(stored(out.Config, i, &out.Layers[i], ts.Name), stored(m.Config, i, &m.Layers[i], ts.Name)) {
						t.Errorf("%s differs from the source's", ts.Name)
					}
				}
			}
			// Each layer keeps its two norms, o_proj and the three MLP
			// projections, and replaces at least q_proj, kv_a and kv_b.
			if len(kept) != 6*len(out.Layers) || len(replaced) < 3*len(out.Layers) {
				t.Errorf("kept %d and replaced %d tensors of %d layers:\nkept %v\nreplaced %v", len(kept), len(replaced), len(out.Layers), kept, replaced)
			}
		})
	}
}

// Run writes the kept tensors as the source stores them when the dtype
// stays (byte for byte), and rounded from their values when it changes.
func TestRunPassesKeptTensorsOn(t *testing.T) {
	src := writeSynthetic(t)
	in, err := safetensors.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	for _, tc := range []struct {
		name  string
		dtype string
		calib bool
	}{
		{"same dtype", "", false},
		{"same dtype calibrated", "", true},
		{"to f32", "f32", false},
		{"to f16", "f16", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "mla")
			job := Job{Source: src, Output: out, DType: tc.dtype, Options: Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightAttention, Rank: 24, Format: FormatExact}}
			if tc.calib {
				job.Calibration = &Calibration{File: calibText(t), Tokens: 256, SeqLen: 64, Seed: 1}
			}
			if _, err := Run(context.Background(), job); err != nil {
				t.Fatal(err)
			}
			c, err := safetensors.Open(out)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var checked int
			for _, name := range c.Names() {
				if !keptTensor(name) {
					continue
				}
				checked++
				srcInfo, _ := in.Info(name)
				outInfo, _ := c.Info(name)
				if tc.dtype == "" {
					a, _ := in.Raw(name)
					b, _ := c.Raw(name)
					if outInfo.DType != srcInfo.DType || !bytes.Equal(a, b) {
						t.Errorf("%s: stored bytes differ from the source's", name)
					}
					continue
				}
				want, err := in.Float32(name)
				if err != nil {
					t.Fatal(err)
				}
				got, err := c.Float32(name)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(got, roundTo(outInfo.DType, want)) {
					t.Errorf("%s: values are not the source's rounded to %s", name, outInfo.DType)
				}
			}
			if checked == 0 {
				t.Fatal("no kept tensor in the output")
			}
		})
	}
}

// The tokenizer, chat-template and generation files present beside the
// source's weights are copied unchanged and listed; others are not.
func TestRunCopiesSideFiles(t *testing.T) {
	src := writeSynthetic(t)
	extra := map[string]string{
		"chat_template.jinja":    "{% for m in messages %}{{ m.content }}{% endfor %}",
		"added_tokens.json":      `{"<tool>": 257}`,
		"generation_config.json": `{"do_sample": false}`,
		"notes.txt":              "not a side file",
	}
	for name, text := range extra {
		if err := os.WriteFile(filepath.Join(src, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(t.TempDir(), "mla")
	sum, err := Run(context.Background(), Job{Source: src, Output: out, Options: Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightAttention, Rank: 24}})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"tokenizer.json", "added_tokens.json", "chat_template.jinja", "generation_config.json"}
	if !slices.Equal(sum.Copied, want) {
		t.Errorf("copied %v, want %v", sum.Copied, want)
	}
	for _, name := range want {
		a, _ := os.ReadFile(filepath.Join(src, name))
		b, err := os.ReadFile(filepath.Join(out, name))
		if err != nil || !bytes.Equal(a, b) {
			t.Errorf("%s: not copied unchanged (%v)", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(out, "notes.txt")); err == nil {
		t.Error("notes.txt was copied")
	}
}
