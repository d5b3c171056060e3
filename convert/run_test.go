package convert

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/safetensors"
)

// editConfig rewrites dir's config.json through edit.
func editConfig(t *testing.T, dir string, edit func(string) string) {
	t.Helper()
	p := filepath.Join(dir, "config.json")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(edit(string(data))), 0o644); err != nil {
		t.Fatal(err)
	}
}

// A source whose config the DeepSeek-V3 layout cannot express (a Mistral
// sliding window) is refused before any layer is converted, not after
// the whole checkpoint was written.
func TestRunRefusesInexpressibleConfigFirst(t *testing.T) {
	src := writeSynthetic(t)
	editConfig(t, src, func(s string) string {
		s = strings.Replace(s, `"LlamaForCausalLM"`, `"MistralForCausalLM"`, 1)
		return strings.Replace(s, "{", `{"sliding_window": 64,`, 1)
	})
	var events []Event
	job := Job{Source: src, Output: filepath.Join(t.TempDir(), "out"),
		Options:  Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightAttention, Rank: 40},
		Progress: func(e Event) { events = append(events, e) }}
	_, err := Run(context.Background(), job)
	if err == nil || !strings.Contains(err.Error(), "sliding window") {
		t.Fatalf("error %v, want one naming the sliding window", err)
	}
	if len(events) != 0 {
		t.Errorf("the conversion got as far as %+v before failing", events[len(events)-1])
	}
}

// The output may not be the source, nor contain it, also when a symbolic
// link names one of them: replacing it (--force) would delete the source.
func TestRunRefusesOutputThatIsTheSourceThroughLinks(t *testing.T) {
	opts := Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightAttention, Rank: 40}
	// Each case gets paths to a source of its own (TMP/gqa), through
	// links made in another directory to the source (src) and its
	// parent (parent).
	for _, tc := range []struct {
		name           string
		source, output func(src, srcLink, parentLink string) string
	}{
		{"source is a link to the output",
			func(_, l, _ string) string { return l }, func(s, _, _ string) string { return s }},
		{"output is a link to the source",
			func(s, _, _ string) string { return s }, func(_, l, _ string) string { return l }},
		{"output is a link to the source's parent",
			func(s, _, _ string) string { return s }, func(_, _, p string) string { return p }},
		{"source lies under a link to the output",
			func(s, _, p string) string { return filepath.Join(p, filepath.Base(s)) }, func(s, _, _ string) string { return filepath.Dir(s) }},
		{"output lies under a link to the source",
			func(s, _, _ string) string { return s }, func(_, l, _ string) string { return filepath.Join(l, "mla") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := writeSynthetic(t)
			links := t.TempDir()
			srcLink, parentLink := filepath.Join(links, "src"), filepath.Join(links, "parent")
			if err := os.Symlink(src, srcLink); err != nil {
				t.Skipf("symbolic links: %v", err)
			}
			if err := os.Symlink(filepath.Dir(src), parentLink); err != nil {
				t.Fatal(err)
			}
			before := snapshot(t, src)
			job := Job{Source: tc.source(src, srcLink, parentLink), Output: tc.output(src, srcLink, parentLink), Force: true, Options: opts}
			_, err := Run(context.Background(), job)
			if err == nil || !strings.Contains(err.Error(), "never modifies") {
				t.Errorf("error %v, want a refusal", err)
			}
			if !sameFiles(snapshot(t, src), before) {
				t.Errorf("the source %s changed", src)
			}
		})
	}
}

// config.json's torch_dtype names the dtype the tensors are stored in,
// also for a source stored as f64, whose dtype the output keeps.
func TestRunTorchDTypeMatchesStoredDType(t *testing.T) {
	for _, tc := range []struct {
		name   string
		source safetensors.DType
		dtype  string
		stored safetensors.DType
		torch  string
	}{
		{"bf16 source", safetensors.BF16, "", safetensors.BF16, "bfloat16"},
		{"bf16 as f16", safetensors.BF16, "f16", safetensors.F16, "float16"},
		{"bf16 as f32", safetensors.BF16, "f32", safetensors.F32, "float32"},
		{"f64 source", safetensors.F64, "", safetensors.F64, "float64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := writeSynthetic(t)
			if tc.source != safetensors.BF16 {
				m, err := model.Load(context.Background(), src, nil)
				if err != nil {
					t.Fatal(err)
				}
				specs, err := m.Tensors(tc.source)
				if err != nil {
					t.Fatal(err)
				}
				if err := safetensors.WriteCheckpoint(context.Background(), src, specs, safetensors.WriteOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			out := filepath.Join(t.TempDir(), "mla")
			job := Job{Source: src, Output: out, DType: tc.dtype,
				Options: Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightAttention, Rank: 40, Format: FormatExact}}
			if _, err := Run(context.Background(), job); err != nil {
				t.Fatal(err)
			}
			data, err := os.ReadFile(filepath.Join(out, "config.json"))
			if err != nil {
				t.Fatal(err)
			}
			var cfg struct {
				TorchDType string `json:"torch_dtype"`
			}
			if err := json.Unmarshal(data, &cfg); err != nil {
				t.Fatal(err)
			}
			c, err := safetensors.Open(out)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			info, _ := c.Info("model.layers.0.self_attn.kv_b_proj.weight")
			if info.DType != tc.stored || cfg.TorchDType != tc.torch {
				t.Errorf("tensors stored as %s with torch_dtype %q, want %s and %q", info.DType, cfg.TorchDType, tc.stored, tc.torch)
			}
		})
	}
}
