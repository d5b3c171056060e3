package convert

import (
	"context"
	"errors"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/sharedtest"
	"github.com/transmla/transmla/internal/synthtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/safetensors"
	"github.com/transmla/transmla/tokenizer"
)

// sharedModel is one of ../shared/models with the evaluation settings the
// tests use on it.
type sharedModel struct {
	name    string
	ctx     int // eval window
	ropeDim int // d_r that divides its head_dim
}

var sharedModels = []sharedModel{
	{"llama-gqa-25m", 1024, 64},
	{"qwen2-gqa-16m", 1024, 64},
	{"stories260K", 256, 4},
}

type fixture struct {
	m   *model.Model
	ids []int // wiki.test.raw tokens
	cal [][]int
	ctx int
}

func loadFixture(t *testing.T, sm sharedModel) *fixture {
	t.Helper()
	if testing.Short() {
		t.Skip("converts and evaluates the shared models: skipped with -short")
	}
	dir := sharedtest.Path(t, filepath.Join("models", sm.name))
	m, err := model.Load(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.Load(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	read := func(rel string) []int {
		text, err := os.ReadFile(sharedtest.Path(t, rel))
		if err != nil {
			t.Fatal(err)
		}
		return tok.Encode(string(text), true)
	}
	f := &fixture{m: m, ids: read("data/wikitext-2-raw/wiki.test.raw"), ctx: sm.ctx}
	cal := read("data/calibration/heldout.txt")
	if f.cal, err = CalibrationSequences(cal, 2048, 256, 42); err != nil {
		t.Fatal(err)
	}
	return f
}

// ppl scores the first two windows, enough for a relative comparison at
// the 1e-4 level and quick on two cores.
func (f *fixture) ppl(t *testing.T, m *model.Model) float64 {
	t.Helper()
	be, err := kernels.Select("auto")
	if err != nil {
		t.Fatal(err)
	}
	r, err := eval.NewRunner(m, be, f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	res, err := eval.Perplexity(context.Background(), r, f.ids, eval.PerplexityOptions{Ctx: f.ctx, MaxWindows: 2})
	if err != nil {
		t.Fatal(err)
	}
	return res.PPL
}

func (f *fixture) moments(t *testing.T) []LayerStats {
	t.Helper()
	m, err := CollectStats(context.Background(), f.m, kernels.NewNative(), f.cal)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func relDiff(a, b float64) float64 { return math.Abs(a-b) / math.Abs(b) }

// GQA is MLA with replicated up-projections: the exact rewrite (every key
// dim keeps its RoPE, no rank cut) must compute the original function. The
// original's perplexity is itself checked against transformers in eval.
func TestExactRewriteKeepsPerplexity(t *testing.T) {
	for _, sm := range sharedModels {
		t.Run(sm.name, func(t *testing.T) {
			f := loadFixture(t, sm)
			want := f.ppl(t, f.m)
			cfg := f.m.Config
			for _, w := range Weightings() {
				opts := Options{ExactRoPE: true, Rank: cfg.NumKVHeads * cfg.HeadDim, Weighting: w}
				out, _, err := ConvertModel(context.Background(), f.m, opts, nil)
				if err != nil {
					t.Fatal(err)
				}
				if got := f.ppl(t, out); relDiff(got, want) > 1e-4 {
					t.Errorf("weighting %s: exact rewrite ppl %.6f, original %.6f", w, got, want)
				}
			}
		})
	}
}

// At the lossless bound the factorization adds no error: the converted
// model equals the RoPE-decoupled model with an unfactored latent, data-free
// and calibrated, so every loss is attributable to one stage.
func TestLosslessRankAddsNoError(t *testing.T) {
	for _, sm := range sharedModels {
		t.Run(sm.name, func(t *testing.T) {
			f := loadFixture(t, sm)
			cfg := f.m.Config
			base := Options{RopeDim: sm.ropeDim, RopeMethod: rope.MethodRoRoPE, NopeSpan: DefaultNopeSpan,
				Weighting: WeightAttention, Rank: LosslessRank(cfg, sm.ropeDim)}
			for _, calibrated := range []bool{false, true} {
				var mom []LayerStats
				if calibrated {
					mom = f.moments(t)
				}
				ropeOnly := base
				ropeOnly.ropeOnly = true
				ref, _, err := ConvertModel(context.Background(), f.m, ropeOnly, mom)
				if err != nil {
					t.Fatal(err)
				}
				want := f.ppl(t, ref)
				got, _, err := ConvertModel(context.Background(), f.m, base, mom)
				if err != nil {
					t.Fatal(err)
				}
				if p := f.ppl(t, got); relDiff(p, want) > 1e-4 {
					t.Errorf("calibrated=%v: ppl %.6f at the lossless rank %d, RoPE-only %.6f", calibrated, p, base.Rank, want)
				}
			}
		})
	}
}

// The stock export's kv_a_layernorm works in its epsilon-dominated regime,
// so it costs (almost) nothing against the exact export on a bias-free
// source; a biased source (Qwen2) pays for the folded biases, a little.
func TestStockFormatMatchesExact(t *testing.T) {
	for _, tc := range []struct {
		sm  sharedModel
		tol float64
	}{
		// The stock export also moves every RMSNorm's epsilon to 1e-6
		// (transformers' fixed kv_a_layernorm epsilon): a few 1e-4 here.
		{sharedModels[0], 3e-3},
		{sharedModels[1], 0.05},
	} {
		t.Run(tc.sm.name, func(t *testing.T) {
			f := loadFixture(t, tc.sm)
			mom := f.moments(t)
			opts := DefaultOptions(f.m.Config, 128)
			exact, _, err := ConvertModel(context.Background(), f.m, opts, mom)
			if err != nil {
				t.Fatal(err)
			}
			opts.Format = FormatStock
			stock, _, err := ConvertModel(context.Background(), f.m, opts, mom)
			if err != nil {
				t.Fatal(err)
			}
			l := stock.Layers[0].MLA
			if l.KVANorm == nil || l.Q.B != nil || l.KVA.B != nil {
				t.Fatal("stock export must have kv_a_layernorm and no q/kv_a biases")
			}
			if a, b := f.ppl(t, stock), f.ppl(t, exact); relDiff(a, b) > tc.tol {
				t.Errorf("stock ppl %.5f, exact %.5f", a, b)
			}
		})
	}
}

// A better latent means lower perplexity: calibrated and attention-weighted
// beat data-free at a real cut (d_c 128 on the Llama).
func TestCalibrationHelpsAtLowRank(t *testing.T) {
	f := loadFixture(t, sharedModels[0])
	mom := f.moments(t)
	opts := Options{RopeDim: 64, RopeMethod: rope.MethodRoRoPE, FreqFold: 4, NopeSpan: DefaultNopeSpan, Weighting: WeightAttention, Rank: 128}
	calibrated, _, err := ConvertModel(context.Background(), f.m, opts, mom)
	if err != nil {
		t.Fatal(err)
	}
	free, _, err := ConvertModel(context.Background(), f.m, opts, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := f.ppl(t, calibrated), f.ppl(t, free); !(a < b) {
		t.Errorf("calibrated ppl %.4f is not below data-free %.4f", a, b)
	}
}

// writeSynthetic writes the built-in checkpoint with a tokenizer and
// returns its directory.
func writeSynthetic(t *testing.T) string {
	return synthtest.Checkpoint(t, model.DefaultSynthetic())
}

// calibText is a text file long enough for small calibration runs.
func calibText(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "calib.txt")
	var b strings.Builder
	for i := range 200 {
		b.WriteString("The latent cache keeps one short vector per token and layer; line ")
		b.WriteString(strings.Repeat("x", i%7))
		b.WriteString(".\n")
	}
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// The streaming Run writes what the in-memory conversion computes: the
// written f32 checkpoint loads as MLA and gives the same logits.
func TestRunWritesWhatConvertModelComputes(t *testing.T) {
	src := writeSynthetic(t)
	out := filepath.Join(t.TempDir(), "mla")
	calib := calibText(t)
	opts := Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, NopeSpan: DefaultNopeSpan, Weighting: WeightAttention, Rank: 40}
	be := kernels.NewNative()
	sum, err := Run(context.Background(), Job{Source: src, Output: out, Options: opts, DType: "f32",
		Calibration: &Calibration{File: calib, Tokens: 512, SeqLen: 64, Seed: 1}, Backend: be})
	if err != nil {
		t.Fatal(err)
	}
	if sum.CacheValuesAfter != 4*(40+16) || sum.CacheValuesBefore != 4*2*2*32 {
		t.Errorf("cache values %d → %d, want %d → %d", sum.CacheValuesBefore, sum.CacheValuesAfter, 4*2*2*32, 4*(40+16))
	}
	written, err := model.Load(context.Background(), out, nil)
	if err != nil {
		t.Fatal(err)
	}
	m, err := model.Load(context.Background(), src, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.Load(filepath.Join(src, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	text, _ := os.ReadFile(calib)
	seqs, err := CalibrationSequences(tok.Encode(string(text), false), 512, 64, 1)
	if err != nil {
		t.Fatal(err)
	}
	mom, err := CollectStats(context.Background(), m, be, seqs)
	if err != nil {
		t.Fatal(err)
	}
	inMemory, _, err := ConvertModel(context.Background(), m, opts, mom)
	if err != nil {
		t.Fatal(err)
	}
	logits := func(mm *model.Model) []float32 {
		r, err := eval.NewRunner(mm, be, 32)
		if err != nil {
			t.Fatal(err)
		}
		l, err := r.Forward(context.Background(), r.NewCache(), []int{1, 50, 60, 70, 80, 90, 100, 110}, true)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	a, b := logits(written), logits(inMemory)
	for i := range a {
		if math.Abs(float64(a[i]-b[i])) > 1e-4*(1+math.Abs(float64(b[i]))) {
			t.Fatalf("logit %d: written model %v, in-memory %v", i, a[i], b[i])
		}
	}
	for _, name := range []string{"config.json", "tokenizer.json", "model.safetensors"} {
		if _, err := os.Stat(filepath.Join(out, name)); err != nil {
			t.Errorf("output lacks %s: %v", name, err)
		}
	}
	ckpt, err := safetensors.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer ckpt.Close()
	meta := ckpt.Metadata()
	if meta["transmla.kv_lora_rank"] != "40" || meta["transmla.calibration_sha256"] == "" {
		t.Errorf("metadata %v lacks d_c or the calibration hash", meta)
	}
}

// Bad input fails before anything is written: no output directory, no
// temporary one beside it, the source untouched.
func TestRunRejectsBadInputAndWritesNothing(t *testing.T) {
	src := writeSynthetic(t)
	good := Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightAttention, Rank: 40}
	nanSrc := writeSynthetic(t)
	poisonLayer(t, nanSrc)
	existing := t.TempDir()
	yarnSrc := writeSynthetic(t)
	setRopeScaling(t, yarnSrc, `{"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 512}`)
	for _, tc := range []struct {
		name  string
		job   Job
		want  string
		outOK bool // the output existed before
	}{
		{"dc above the lossless bound", Job{Source: src, Options: with(good, func(o *Options) { o.Rank = 113 })}, "lossless bound", false},
		{"odd rope dim", Job{Source: src, Options: with(good, func(o *Options) { o.RopeDim = 7 })}, "even", false},
		{"rope dim above head_dim", Job{Source: src, Options: with(good, func(o *Options) { o.RopeDim = 64 })}, "exceeds head_dim", false},
		{"non-finite weights", Job{Source: nanSrc, Options: good}, "non-finite", false},
		{"unreadable calibration file", Job{Source: src, Options: good, Calibration: &Calibration{File: filepath.Join(src, "absent.txt"), Tokens: 512, SeqLen: 64}}, "calibration file", false},
		{"existing output without force", Job{Source: src, Output: existing, Options: good}, "--force", true},
		{"output is the source", Job{Source: src, Output: src, Options: good}, "never modifies", true},
		{"output contains the source", Job{Source: src, Output: filepath.Dir(src), Options: good, Force: true}, "never modifies", true},
		{"stock as f16", Job{Source: src, Options: with(good, func(o *Options) { o.Format = FormatStock }), DType: "f16"}, "f16", false},
		{"yarn source", Job{Source: yarnSrc, Options: good}, "yarn", false},
		{"bad dtype", Job{Source: src, Options: good, DType: "int8"}, "--dtype", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			job := tc.job
			parent := t.TempDir()
			if job.Output == "" {
				job.Output = filepath.Join(parent, "out")
			}
			_, err := Run(context.Background(), job)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one mentioning %q", err, tc.want)
			}
			if !tc.outOK {
				if _, err := os.Stat(job.Output); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("output %s exists after a failed run", job.Output)
				}
			}
			if entries, _ := os.ReadDir(parent); len(entries) != 0 {
				t.Errorf("left behind: %v", entries)
			}
		})
	}
}

// setRopeScaling rewrites config.json with the given rope_scaling object.
func setRopeScaling(t *testing.T, dir, scaling string) {
	t.Helper()
	p := filepath.Join(dir, "config.json")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(data), "{", `{"rope_scaling": `+scaling+`,`, 1)
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

func with(o Options, f func(*Options)) Options {
	f(&o)
	return o
}

// poisonLayer rewrites the synthetic checkpoint with a NaN in the last
// layer's v_proj, so the failure comes after earlier layers were converted.
func poisonLayer(t *testing.T, dir string) {
	t.Helper()
	m, err := model.Load(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	m.Layers[len(m.Layers)-1].V.W[3] = float32(math.NaN())
	specs, err := m.Tensors(safetensors.F32)
	if err != nil {
		t.Fatal(err)
	}
	if err := safetensors.WriteCheckpoint(context.Background(), dir, specs, safetensors.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// Converting the same model twice gives the same weights, bit for bit: the
// latent's eigenvector signs are fixed by convention, not by rounding noise.
func TestConversionIsDeterministic(t *testing.T) {
	dir := t.TempDir()
	if err := model.WriteSynthetic(context.Background(), dir, model.DefaultSynthetic()); err != nil {
		t.Fatal(err)
	}
	m, err := model.Load(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	var first *model.Model
	for run := range 3 {
		out, _, err := ConvertModel(context.Background(), m, DefaultOptions(m.Config, 32), nil)
		if err != nil {
			t.Fatal(err)
		}
		if first == nil {
			first = out
			continue
		}
		for l := range out.Layers {
			got, want := out.Layers[l].MLA, first.Layers[l].MLA
			if !slices.Equal(got.KVA.W, want.KVA.W) || !slices.Equal(got.KVB.W, want.KVB.W) || !slices.Equal(got.Q.W, want.Q.W) {
				t.Fatalf("run %d, layer %d: weights differ from the first run", run, l)
			}
		}
	}
}
