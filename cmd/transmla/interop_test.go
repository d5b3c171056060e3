package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/interoptest"
	"github.com/transmla/transmla/internal/sharedtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
)

// These tests load this project's inputs and outputs in Hugging Face
// transformers (scripts/interop/hf.py, through the pinned harness) and
// compare: the shared models as they are, their default (stock) exports,
// a padded export, and exports of RoPE-scaled sources.

// sharedModel is one of ../shared's models with the context it is
// evaluated at (stories260K has 512 positions).
type sharedModel struct {
	name string
	ctx  int
	dc   string
}

var sharedModels = []sharedModel{{"llama-gqa-25m", 1024, "192"}, {"qwen2-gqa-16m", 1024, "192"}, {"stories260K", 512, "32"}}

// interopWindows is how many windows of wiki.test.raw the checks score.
const interopWindows = 8

// hfPPL is hf.py ppl's output.
type hfPPL struct {
	PPL          float64 `json:"ppl"`
	TokensScored int     `json:"tokens_scored"`
	TokensInFile int     `json:"tokens_in_file"`
}

// pplBoth measures dir's perplexity on the first windows of wiki.test.raw
// with transmla eval (float32 cache) and with transformers (float32).
func pplBoth(t *testing.T, dir string, ctx, windows int) (ours, theirs float64) {
	t.Helper()
	data := sharedtest.Path(t, "data/wikitext-2-raw/wiki.test.raw")
	stdout, stderr, code := run(t, "eval", dir, "--data", data, "--ctx", strconv.Itoa(ctx), "--max-windows", strconv.Itoa(windows), "--json")
	if code != 0 {
		t.Fatalf("eval %s exit %d: %s", dir, code, stderr)
	}
	var ev evalReport
	if err := json.Unmarshal([]byte(stdout), &ev); err != nil {
		t.Fatal(err)
	}
	var hf hfPPL
	interoptest.HF(t, &hf, "ppl", dir, "--data", data, "--ctx", strconv.Itoa(ctx), "--max-windows", strconv.Itoa(windows))
	if hf.TokensScored != ev.TokensScored || hf.TokensInFile != ev.TokensInFile {
		t.Fatalf("%s: transformers scored %d of %d tokens, transmla %d of %d", dir, hf.TokensScored, hf.TokensInFile, ev.TokensScored, ev.TokensInFile)
	}
	return ev.PPL, hf.PPL
}

func relDiff(a, b float64) float64 { return math.Abs(a-b) / math.Abs(b) }

// The shared models in their own transformers classes give transmla eval's
// perplexity on the same windows (float32 both).
func TestOriginalsMatchTransformers(t *testing.T) {
	interoptest.Python(t)
	for _, m := range sharedModels {
		t.Run(m.name, func(t *testing.T) {
			ours, theirs := pplBoth(t, sharedtest.Path(t, "models/"+m.name), m.ctx, interopWindows)
			t.Logf("%s: transmla %.6f, transformers %.6f, relative difference %.2e", m.name, ours, theirs, relDiff(ours, theirs))
			if relDiff(ours, theirs) > 1e-4 {
				t.Errorf("perplexity %.6f differs from transformers' %.6f by more than 1e-4", ours, theirs)
			}
		})
	}
}

// convertShared converts a shared model, calibrated, with the defaults
// and args, into a new directory.
func convertShared(t *testing.T, name string, args ...string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), name+"-mla")
	all := append([]string{"convert", sharedtest.Path(t, "models/"+name), "-o", out,
		"--calib", sharedtest.Path(t, "data/calibration/heldout.txt")}, args...)
	if _, stderr, code := run(t, all...); code != 0 {
		t.Fatalf("convert %v exit %d: %s", args, code, stderr)
	}
	return out
}

var greedyPrompts = []string{"The history of the city", "In 1990, the team", "She opened the door and"}

// greedyAgree compares transmla generate (float32 cache) with transformers'
// greedy continuation of each prompt: identical, or apart only after a
// step where transformers' two best logits are within tie of each other.
func greedyAgree(t *testing.T, dir string, tie float64) {
	t.Helper()
	var hf struct {
		Runs []struct {
			Prompt string    `json:"prompt"`
			IDs    []int     `json:"ids"`
			Gaps   []float64 `json:"top2_gaps"`
		} `json:"runs"`
	}
	args := []string{"greedy", dir, "--max-tokens", "32"}
	for _, p := range greedyPrompts {
		args = append(args, "--prompt", p)
	}
	interoptest.HF(t, &hf, args...)
	for i, p := range greedyPrompts {
		stdout, stderr, code := run(t, "generate", dir, "--prompt", p, "--max-tokens", "32", "--ids", "--ignore-eos", "--cache-dtype", "f32")
		if code != 0 {
			t.Fatalf("generate exit %d: %s", code, stderr)
		}
		var ours []int
		if err := json.Unmarshal([]byte(stdout), &ours); err != nil {
			t.Fatal(err)
		}
		want := hf.Runs[i].IDs
		if slices.Equal(ours, want) {
			continue
		}
		k := 0
		for k < min(len(ours), len(want)) && ours[k] == want[k] {
			k++
		}
		if k < len(want) && hf.Runs[i].Gaps[k] <= tie {
			t.Logf("prompt %q: continuations part at step %d after a near tie (transformers' top-2 gap %.2e)", p, k, hf.Runs[i].Gaps[k])
			continue
		}
		t.Errorf("prompt %q: greedy ids differ first at step %d (transformers' top-2 gap there %.3g):\n transmla     %v\n transformers %v", p, k, hf.Runs[i].Gaps[min(k, len(want)-1)], ours, want)
	}
}

// The default export of each shared model loads in transformers'
// DeepseekV3ForCausalLM and gives transmla eval's perplexity and greedy
// continuations; saved again by transformers, it is read by transmla with
// the same result.
func TestStockExportsMatchTransformers(t *testing.T) {
	interoptest.Python(t)
	for _, m := range sharedModels {
		t.Run(m.name, func(t *testing.T) {
			dir := convertShared(t, m.name, "--dc", m.dc)
			ours, theirs := pplBoth(t, dir, m.ctx, interopWindows)
			t.Logf("%s dc %s: transmla %.6f, transformers %.6f, relative difference %.2e", m.name, m.dc, ours, theirs, relDiff(ours, theirs))
			if relDiff(ours, theirs) > 1e-3 {
				t.Errorf("perplexity %.6f differs from transformers' %.6f by more than 1e-3", ours, theirs)
			}
			greedyAgree(t, dir, 1e-3)

			resaved := filepath.Join(t.TempDir(), "resaved")
			var rs struct{ Architecture string }
			interoptest.HF(t, &rs, "resave", dir, resaved)
			again, _, code := run(t, "eval", resaved, "--data", sharedtest.Path(t, "data/wikitext-2-raw/wiki.test.raw"),
				"--ctx", strconv.Itoa(m.ctx), "--max-windows", strconv.Itoa(interopWindows), "--json")
			if code != 0 {
				t.Fatalf("eval of the re-saved model exit %d", code)
			}
			var ev evalReport
			if err := json.Unmarshal([]byte(again), &ev); err != nil {
				t.Fatal(err)
			}
			t.Logf("re-saved by transformers (%s): transmla %.6f", rs.Architecture, ev.PPL)
			if relDiff(ev.PPL, ours) > 1e-6 {
				t.Errorf("the re-saved model's perplexity %.8f differs from the export's %.8f", ev.PPL, ours)
			}
		})
	}
}

// A refined export (stock format, whose kv_a_layernorm the refinement
// fits too) is a normal checkpoint: transformers computes what transmla
// eval does on it.
func TestRefinedExportMatchesTransformers(t *testing.T) {
	interoptest.Python(t)
	m := sharedModels[2] // stories260K: refined in seconds
	dir := convertShared(t, m.name, "--dc", "16", "--calib-seq", "256", "--calib-tokens", "8192", "--refine", "--refine-steps", "20")
	ours, theirs := pplBoth(t, dir, m.ctx, interopWindows)
	t.Logf("%s dc 16 refined: transmla %.6f, transformers %.6f, relative difference %.2e", m.name, ours, theirs, relDiff(ours, theirs))
	if relDiff(ours, theirs) > 1e-3 {
		t.Errorf("perplexity %.6f differs from transformers' %.6f by more than 1e-3", ours, theirs)
	}
	greedyAgree(t, dir, 1e-3)
}

// A latent padded to vLLM's CPU width computes what the unpadded one does,
// in transmla (which strips the padding: no cache cost) and transformers.
func TestPaddedExportComputesTheSame(t *testing.T) {
	interoptest.Python(t)
	const windows = 4
	plain := convertShared(t, "llama-gqa-25m", "--dc", "448")
	padded := convertShared(t, "llama-gqa-25m", "--dc", "448", "--target", "vllm-cpu")
	cfg, err := model.LoadConfig(filepath.Join(padded, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if m := cfg.MLA; m.KVLoraRank != 448 || m.LatentPad != 64 {
		t.Fatalf("padded export: latent %d + padding %d, want 448 + 64", m.KVLoraRank, m.LatentPad)
	}
	oursPlain, theirsPlain := pplBoth(t, plain, 1024, windows)
	oursPadded, theirsPadded := pplBoth(t, padded, 1024, windows)
	t.Logf("dc 448: transmla %.6f, transformers %.6f; padded to 512: transmla %.6f, transformers %.6f", oursPlain, theirsPlain, oursPadded, theirsPadded)
	for _, c := range []struct {
		what string
		a, b float64
		tol  float64
	}{
		{"transmla, padded against unpadded", oursPadded, oursPlain, 1e-4},
		{"transformers, padded against unpadded", theirsPadded, theirsPlain, 1e-4},
		{"padded, transmla against transformers", oursPadded, theirsPadded, 1e-3},
	} {
		if relDiff(c.a, c.b) > c.tol {
			t.Errorf("%s: %.6f and %.6f differ by %.2e (> %.0e)", c.what, c.a, c.b, relDiff(c.a, c.b), c.tol)
		}
	}
	stdout, _, _ := run(t, "eval", padded, "--data", sharedtest.Path(t, "data/calibration/heldout.txt"), "--ctx", "64", "--max-windows", "1", "--json")
	var ev evalReport
	if err := json.Unmarshal([]byte(stdout), &ev); err != nil {
		t.Fatal(err)
	}
	if ev.KVCacheValuesPerToken != 6*(448+64) {
		t.Errorf("transmla caches %d values per token for the padded export, want 6·(448+64) = %d", ev.KVCacheValuesPerToken, 6*(448+64))
	}
}

// Exports of sources with plain RoPE and rope_scaling linear and llama3
// (random transformers Llamas), at the default RoPE stride and at the
// strides that change the export's rope_theta (1, 1/2), compute in
// transformers what transmla computes — whose frequencies convert checks
// against the source's — and vLLM, whose DeepSeek path would replace the
// scaling with its own YaRN, is refused for the scaled ones.
func TestRopeExports(t *testing.T) {
	interoptest.Python(t)
	ids := make([]int, 96)
	for i := range ids {
		ids[i] = (i*71 + 3) % 97
	}
	idList := strings.Trim(strings.Join(strings.Fields(fmt.Sprint(ids)), ","), "[]")
	for _, tc := range []struct {
		sc     map[string]any
		stride string
	}{
		{map[string]any{"rope_type": "default", "rope_theta": 10000.0}, "1"},
		{map[string]any{"rope_type": "default", "rope_theta": 10000.0}, "0.5"},
		{map[string]any{"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, ""},
		{map[string]any{"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, "1/2"},
		{map[string]any{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}, ""},
		{map[string]any{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}, "1"},
	} {
		sc, name := tc.sc, tc.sc["rope_type"].(string)
		args := []string{"--dc", "96", "--rope-dim", "16"}
		if tc.stride != "" {
			args = append(args, "--rope-stride", tc.stride)
		}
		t.Run(name+" stride "+cmp.Or(tc.stride, "default"), func(t *testing.T) {
			src := filepath.Join(t.TempDir(), "src")
			spec, _ := json.Marshal(map[string]any{"arch": "LlamaForCausalLM", "dtype": "float32", "seed": 3, "ids": ids, "config": map[string]any{
				"hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
				"num_key_value_heads": 2, "head_dim": 32, "vocab_size": 97, "max_position_embeddings": 128,
				"rms_norm_eps": 1e-6, "rope_parameters": sc,
			}})
			var made struct{}
			interoptest.HF(t, &made, "fixture", src, "--spec", string(spec))
			out := filepath.Join(t.TempDir(), "mla")
			if _, stderr, code := run(t, append([]string{"convert", src, "-o", out}, args...)...); code != 0 {
				t.Fatalf("convert exit %d: %s", code, stderr)
			}
			logits := filepath.Join(t.TempDir(), "logits.f32")
			interoptest.HF(t, &made, "logits", out, logits, "--ids", idList)
			want := interoptest.ReadLogits(t, logits)
			m, err := model.Load(context.Background(), out, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got := cmp.Or(m.Config.Rope.Scaling.Type, "default"); got != name {
				t.Fatalf("the export's rope_scaling is %q, want %q", got, name)
			}
			r, err := eval.NewRunner(m, kernels.NewNative(), len(ids))
			if err != nil {
				t.Fatal(err)
			}
			got, err := r.Forward(context.Background(), r.NewCache(), ids, true)
			if err != nil {
				t.Fatal(err)
			}
			var diff, scale float64
			for i := range want {
				diff = math.Max(diff, math.Abs(float64(got[i]-want[i])))
				scale = math.Max(scale, math.Abs(float64(want[i])))
			}
			t.Logf("rope_scaling %s, stride %s (rope_theta %g): converted model's logits, transmla against transformers: %.2e relative", name, cmp.Or(tc.stride, "default"), m.Config.Rope.Theta, diff/scale)
			if diff/scale > 1e-5 {
				t.Errorf("logits differ by %.3g relative", diff/scale)
			}
			if name == "default" {
				return
			}
			_, stderr, code := run(t, append([]string{"convert", src, "-o", out + "-vllm", "--target", "vllm"}, args...)...)
			if code != 2 || !strings.Contains(stderr, "rope_scaling "+name) {
				t.Errorf("convert --target vllm of a %s source: exit %d, %s; want a usage error naming the scaling", name, code, stderr)
			}
		})
	}
}
