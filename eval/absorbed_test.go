package eval_test

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/transmla/transmla/convert"
	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/sharedtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/safetensors"
	"github.com/transmla/transmla/tokenizer"
)

type llamaPair struct {
	src, dst *model.Model
	ids      []int
}

// converted caches the conversion across the tests of this file; the
// models are only read.
var converted = sync.OnceValues(func() (llamaPair, error) {
	dir := filepath.Join(sharedDir, "models/llama-gqa-25m")
	text, err := os.ReadFile(filepath.Join(sharedDir, "data/wikitext-2-raw/wiki.test.raw"))
	if err != nil {
		return llamaPair{}, err
	}
	src, err := model.Load(context.Background(), dir, nil)
	if err != nil {
		return llamaPair{}, err
	}
	tok, err := tokenizer.Load(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		return llamaPair{}, err
	}
	opts := convert.DefaultOptions(src.Config, 192)
	if opts.RopeDim != 64 {
		return llamaPair{}, fmt.Errorf("default rope dim %d, the issue's check is at 64", opts.RopeDim)
	}
	dst, _, err := convert.ConvertModel(context.Background(), src, opts, nil)
	return llamaPair{src, dst, tok.Encode(string(text[:200000]), true)}, err
})

// sharedDir is ../shared, set by convertedLlama once it is known to exist.
var sharedDir string

// convertedLlama returns llama-gqa-25m, its in-memory conversion at
// d_c = 192, d_r = 64 (data-free: the comparisons are between kernels on the
// same weights, whatever their quality) and the first tokens of the
// evaluation text.
func convertedLlama(t *testing.T) (src, dst *model.Model, ids []int) {
	t.Helper()
	sharedtest.Path(t, "models/llama-gqa-25m")
	sharedtest.Path(t, "data/wikitext-2-raw/wiki.test.raw")
	sharedDir = filepath.Dir(sharedtest.Path(t, "models"))
	p, err := converted()
	if err != nil {
		t.Fatal(err)
	}
	return p.src, p.dst, p.ids
}

func relDiff(a, b []float32) float64 {
	var num, den float64
	for i := range a {
		d := float64(a[i]) - float64(b[i])
		num += d * d
		den += float64(b[i]) * float64(b[i])
	}
	return math.Sqrt(num / den)
}

// The absorbed kernel and the decompressed path compute the same attention:
// prefill logits, decode logits after a prompt, and perplexity agree to
// 1e-4 relative on the converted llama.
func TestAbsorbedMatchesDecompressedOnConvertedLlama(t *testing.T) {
	_, m, ids := convertedLlama(t)
	be := kernels.NewNative()
	ctx := context.Background()
	runners := map[eval.MLAPath]*eval.Runner{}
	for _, p := range []eval.MLAPath{eval.PathAbsorbed, eval.PathDecompressed} {
		r, err := eval.NewRunnerWith(m, be, eval.Options{MaxPositions: 512, MLAPath: p})
		if err != nil {
			t.Fatal(err)
		}
		runners[p] = r
	}
	run := func(p eval.MLAPath) (prefill []float32, decode [][]float32, ppl float64) {
		r := runners[p]
		var err error
		if prefill, err = r.Forward(ctx, r.NewCache(), ids[:300], true); err != nil {
			t.Fatal(err)
		}
		cache := r.NewCache()
		if _, err := r.Forward(ctx, cache, ids[:290], false); err != nil {
			t.Fatal(err)
		}
		for i := 290; i < 300; i++ {
			out, err := r.Forward(ctx, cache, ids[i:i+1], false)
			if err != nil {
				t.Fatal(err)
			}
			decode = append(decode, out)
		}
		res, err := eval.Perplexity(ctx, r, ids, eval.PerplexityOptions{Ctx: 512, MaxWindows: 3})
		if err != nil {
			t.Fatal(err)
		}
		return prefill, decode, res.PPL
	}
	pa, da, ppla := run(eval.PathAbsorbed)
	pd, dd, ppld := run(eval.PathDecompressed)
	if e := relDiff(pa, pd); !(e < 1e-4) {
		t.Errorf("prefill logits: relative difference %.3g", e)
	}
	for i := range da {
		if e := relDiff(da[i], dd[i]); !(e < 1e-4) {
			t.Errorf("decode step %d: relative difference %.3g", i, e)
		}
	}
	if e := math.Abs(ppla-ppld) / ppld; !(e < 1e-4) {
		t.Errorf("perplexity absorbed %.6f, decompressed %.6f: relative difference %.3g", ppla, ppld, e)
	}
	t.Logf("ppl (3 windows of 512) absorbed %.6f, decompressed %.6f", ppla, ppld)
	// The decode steps also match a full forward of the 300 tokens.
	V := m.Config.VocabSize
	for i, step := range da {
		if e := relDiff(step, pa[(290+i)*V:(291+i)*V]); !(e < 1e-4) {
			t.Errorf("decode step %d against the full forward: %.3g", i, e)
		}
	}
}

// The cache holds d_c + d_r values per position and layer for the MLA model
// and 2·n_kv·d_h for the original, in the cache dtype, and nothing else.
func TestCacheBytesAllocated(t *testing.T) {
	src, dst, ids := convertedLlama(t)
	for _, dt := range []kernels.RowDType{kernels.RowBF16, kernels.RowF32} {
		for _, tc := range []struct {
			name   string
			m      *model.Model
			values int
		}{
			{"gqa", src, 2 * 2 * 128},
			{"mla", dst, 192 + 64},
		} {
			t.Run(fmt.Sprintf("%s/%s", tc.name, dt), func(t *testing.T) {
				r, err := eval.NewRunnerWith(tc.m, kernels.NewNative(), eval.Options{MaxPositions: 1024, CacheDType: dt})
				if err != nil {
					t.Fatal(err)
				}
				layers := int64(tc.m.Config.NumLayers)
				perToken := int64(tc.values) * layers * int64(dt.Bytes())
				cache := r.NewCache()
				if got := cache.BytesAllocated(); got != 0 {
					t.Errorf("empty cache holds %d bytes", got)
				}
				// 256 positions fill two pages exactly.
				if _, err := r.Forward(context.Background(), cache, ids[:256], false); err != nil {
					t.Fatal(err)
				}
				if got, want := cache.BytesAllocated(), 256*perToken; got != want {
					t.Errorf("256 positions: %d bytes allocated, want %d", got, want)
				}
				cache.Reserve(1024)
				if got, want := cache.BytesAllocated(), 1024*perToken; got != want {
					t.Errorf("1024 positions: %d bytes allocated, want %d", got, want)
				}
				// The model package's own count of the cache per token agrees.
				sdt := map[kernels.RowDType]safetensors.DType{kernels.RowBF16: safetensors.BF16, kernels.RowF32: safetensors.F32}[dt]
				if got := tc.m.Config.KVCacheBytesPerToken(sdt); got != perToken || cache.RowBytes() != perToken {
					t.Errorf("config says %d bytes per token, cache rows %d, want %d", got, cache.RowBytes(), perToken)
				}
			})
		}
	}
}

// A batch of sequences of different lengths, prefilled and then decoded
// together, gives each sequence the logits it gets alone.
func TestForwardBatchMatchesSingle(t *testing.T) {
	src, dst, ids := convertedLlama(t)
	ctx := context.Background()
	for name, m := range map[string]*model.Model{"gqa": src, "mla": dst} {
		t.Run(name, func(t *testing.T) {
			r, err := eval.NewRunnerWith(m, kernels.NewNative(), eval.Options{MaxPositions: 256, CacheDType: kernels.RowBF16})
			if err != nil {
				t.Fatal(err)
			}
			prompts := [][]int{ids[:40], ids[100:103], ids[200:300]}
			caches := []*eval.KVCache{r.NewCache(), r.NewCache(), r.NewCache()}
			got, err := r.ForwardBatch(ctx, caches, prompts, false)
			if err != nil {
				t.Fatal(err)
			}
			next := [][]int{{ids[40]}, {ids[103]}, {ids[300]}}
			got2, err := r.ForwardBatch(ctx, caches, next, false)
			if err != nil {
				t.Fatal(err)
			}
			for i, p := range prompts {
				alone := r.NewCache()
				want, err := r.Forward(ctx, alone, p, false)
				if err != nil {
					t.Fatal(err)
				}
				want2, err := r.Forward(ctx, alone, next[i], false)
				if err != nil {
					t.Fatal(err)
				}
				if e := relDiff(got[i], want); !(e < 1e-5) {
					t.Errorf("sequence %d prefill: %.3g", i, e)
				}
				if e := relDiff(got2[i], want2); !(e < 1e-5) {
					t.Errorf("sequence %d decode: %.3g", i, e)
				}
			}
		})
	}
}
