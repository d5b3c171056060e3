package convert

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/sharedtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/tokenizer"
)

// BenchmarkLayer8B converts layer 0 of the checkpoint named by
// $TRANSMLA_BENCH_8B (write one with `transmla synth --shape llama3-8b
// --layers 1`; scripts/bench_convert_8b.sh does) at d_c 512, d_r 64 with
// the default options: data-free, then calibrated on 32768 tokens of the
// shared held-out text in sequences of 512 (convert's defaults). The
// calibration forward pass, with its moment accumulation, is its own
// sub-benchmark. Run with -benchtime 1x.
func BenchmarkLayer8B(b *testing.B) {
	dir := os.Getenv("TRANSMLA_BENCH_8B")
	if dir == "" {
		b.Skip("set TRANSMLA_BENCH_8B to a Llama-3-8B-shaped checkpoint (transmla synth --shape llama3-8b)")
	}
	ctx := context.Background()
	r, err := model.OpenReader(dir)
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	src := r.Config()
	l, err := r.Layer(ctx, 0)
	if err != nil {
		b.Fatal(err)
	}
	opts := DefaultOptions(src, 512)
	if err := opts.Validate(src); err != nil {
		b.Fatal(err)
	}
	dst := TargetConfig(src, opts)
	b.Run("convert-data-free", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := ConvertLayer(src, dst, opts, l, nil); err != nil {
				b.Fatal(err)
			}
		}
	})

	const tokens, seqLen = 32768, 512
	tok, err := tokenizer.Load(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		b.Fatal(err)
	}
	text, err := os.ReadFile(sharedtest.Path(b, "data/calibration/heldout.txt"))
	if err != nil {
		b.Fatal(err)
	}
	seqs, err := CalibrationSequences(tok.Encode(string(text), true), tokens, seqLen, 42)
	if err != nil {
		b.Fatal(err)
	}
	var flat []int
	for _, s := range seqs {
		flat = append(flat, s...)
	}
	embed, err := r.Embed()
	if err != nil {
		b.Fatal(err)
	}
	hidden, err := eval.EmbedTokens(src, embed, flat)
	if err != nil {
		b.Fatal(err)
	}
	embed = nil
	be := kernels.NewNative()
	var stats *LayerStats
	b.Run("forward-32768", func(b *testing.B) {
		for b.Loop() {
			lr, err := eval.NewLayerRunner(src, be, seqLen)
			if err != nil {
				b.Fatal(err)
			}
			h := append([]float32(nil), hidden...)
			if stats, err = layerStats(ctx, lr, be, src, l, h, len(seqs)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("convert-calibrated", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := ConvertLayer(src, dst, opts, l, stats); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkRun8B is the end-to-end data-free conversion (read, convert,
// write) of the $TRANSMLA_BENCH_8B checkpoint at d_c 512, d_r 64, for
// profiles; scripts/bench_convert_8b.sh times the CLI against cp+sha256sum.
func BenchmarkRun8B(b *testing.B) {
	dir := os.Getenv("TRANSMLA_BENCH_8B")
	if dir == "" {
		b.Skip("set TRANSMLA_BENCH_8B to a Llama-3-8B-shaped checkpoint (transmla synth --shape llama3-8b)")
	}
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		b.Fatal(err)
	}
	out := filepath.Join(b.TempDir(), "out")
	for b.Loop() {
		job := Job{Source: dir, Output: out, Force: true, Options: DefaultOptions(cfg, 512), Backend: kernels.NewNative()}
		if _, err := Run(context.Background(), job); err != nil {
			b.Fatal(err)
		}
	}
}
