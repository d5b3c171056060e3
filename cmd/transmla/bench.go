package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/safetensors"
)

// benchResult is one (model, ctx) measurement of bench.
type benchResult struct {
	Model                   string  `json:"model"`
	Architecture            string  `json:"architecture"`
	Ctx                     int     `json:"ctx"`
	Batch                   int     `json:"batch"`
	DecodeTokensPerSecond   float64 `json:"decode_tokens_per_second"`
	PrefillTokensPerSecond  float64 `json:"prefill_tokens_per_second"`
	KVCacheBytesAllocated   int64   `json:"kv_cache_bytes_allocated"`
	KVCacheBytesPerToken    int64   `json:"kv_cache_bytes_per_token"`
	CacheDType              string  `json:"cache_dtype"`
	DecodeStepSeconds       float64 `json:"decode_step_seconds_median"`
	AttentionSeconds        float64 `json:"attention_seconds_per_layer_median"`
	AttentionBytesPerSecond float64 `json:"attention_cache_bytes_per_second"`
	AttentionOfCopy         float64 `json:"attention_fraction_of_copy_bandwidth"`
	// WeightBytesPerStep is the weights one decode step reads (every
	// layer's projections and the LM head, in their resident dtype), and
	// WeightBytesPerSecond that over the median step time.
	WeightBytesPerStep     int64   `json:"weight_bytes_per_step"`
	WeightBytesPerSecond   float64 `json:"weight_bytes_per_second"`
	WeightOfCopy           float64 `json:"weight_fraction_of_copy_bandwidth"`
	WeightDType            string  `json:"weight_dtype"`
	BeyondTrainedPositions bool    `json:"beyond_trained_positions"`
}

// benchRatio compares the second model with the first at one ctx.
type benchRatio struct {
	Ctx     int     `json:"ctx"`
	Decode  float64 `json:"decode_speedup"`
	Prefill float64 `json:"prefill_speedup"`
	Cache   float64 `json:"cache_bytes_ratio"`
}

type benchReport struct {
	Results []benchResult `json:"results"`
	Ratios  []benchRatio  `json:"ratios,omitempty"`
	// CopyBytesPerSecond is a multi-threaded memory copy's rate, counting
	// the bytes read plus the bytes written (STREAM's convention).
	CopyBytesPerSecond float64 `json:"copy_bytes_per_second"`
	Backend            string  `json:"backend"`
	Threads            int     `json:"threads"`
	MLAPath            string  `json:"mla_path"`
	// PeakRSSBytes is the process's peak resident set size at the end.
	PeakRSSBytes int64 `json:"peak_rss_bytes"`
}

func benchCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:      "bench",
		Usage:     "decode and prefill speed and KV-cache memory of one or two models, side by side",
		ArgsUsage: "MODEL [MODEL2]",
		Description: `For each --ctx, each model prefills ctx tokens (chunks of --prefill-chunk, the
tokens drawn at random from the vocabulary: speed does not depend on them) and
then decodes --decode-tokens steps for --batch sequences at that context; the
other sequences of a batch start from a copy of the first one's cache. Decode
speed is batch / median step time; a ctx of 0 decodes from an empty cache.
The two models' decode steps alternate, so a shared machine's load hits both
alike, and the second model's speed-ups over the first are printed.

Each decode step reads every weight once: the weight bytes per step over the
median step time are compared with a memory copy measured in the same run
(read + write bytes per second, STREAM's convention). The attention kernel of
one layer is also timed alone on the filled cache (median of 9), giving the
bytes of cache it reads per second against the same copy.

Contexts beyond a model's max_position_embeddings are allowed (RoPE extends;
the speed is what is measured, not the quality) and marked.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "ctx", Usage: "comma-separated contexts in tokens (0: decode from an empty cache)", Value: "0,1024,4096"},
			&cli.IntFlag{Name: "batch", Usage: "sequences decoded together", Value: 1},
			&cli.IntFlag{Name: "decode-tokens", Usage: "decode steps timed per context", Value: 16},
			&cli.IntFlag{Name: "prefill-chunk", Usage: "tokens per prefill forward pass", Value: 2048},
			&cli.StringFlag{Name: "cache-dtype", Usage: "KV cache storage: bf16, f16, f32, or model (the checkpoint's dtype)", Value: "model"},
			&cli.StringFlag{Name: "mla-path", Usage: "MLA attention: auto (absorbed for decoding, the cheaper per prefill shape), absorbed, decompressed", Value: "auto"},
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object instead of a table"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() < 1 || c.NArg() > 2 {
				return usagef("bench takes one or two model directories, got %d arguments", c.NArg())
			}
			ctxs, err := parseInts(c.String("ctx"))
			if err != nil {
				return usagef("--ctx: %v", err)
			}
			batch, steps, chunk := c.Int("batch"), c.Int("decode-tokens"), c.Int("prefill-chunk")
			if batch < 1 || steps < 1 || chunk < 1 {
				return usagef("--batch, --decode-tokens and --prefill-chunk must be positive")
			}
			path, err := eval.ParseMLAPath(c.String("mla-path"))
			if err != nil {
				return usageError{err}
			}
			if err := checkCacheDType(c.String("cache-dtype")); err != nil {
				return err
			}
			be, err := backendFor(c)
			if err != nil {
				return err
			}
			// Measured before the models are loaded, its buffers handed back
			// to the system, so that they and the weights are never
			// resident together (peak RSS is reported).
			copyRate := copyBandwidth()
			debug.FreeOSMemory()
			var models []*model.Model
			var names []string
			for _, arg := range c.Args().Slice() {
				dir, err := modelDir(arg)
				if err != nil {
					return err
				}
				m, err := loadWeights(c.Context, dir, c.App.ErrWriter)
				if err != nil {
					return err
				}
				models, names = append(models, m), append(names, dir)
			}
			rep := benchReport{Backend: be.Name(), Threads: runtime.GOMAXPROCS(0), MLAPath: path.String()}
			rep.CopyBytesPerSecond = copyRate
			bar := newProgress(c.App.ErrWriter, len(ctxs), "benchmarking")
			for i, ctx := range ctxs {
				runs := make([]*benchRun, len(models))
				for j, m := range models {
					dt, err := cacheDType(c.String("cache-dtype"), m)
					if err != nil {
						return err
					}
					if runs[j], err = prepareBench(c.Context, m, be, benchSetup{ctx: ctx, batch: batch, steps: steps, chunk: chunk, dtype: dt, path: path}); err != nil {
						return fmt.Errorf("bench %s at ctx %d: %w", names[j], ctx, err)
					}
				}
				// Decode steps alternate between the models, so that a
				// shared machine's load changes hit both alike.
				for range steps {
					for j, r := range runs {
						if err := r.step(c.Context); err != nil {
							return fmt.Errorf("bench %s at ctx %d: %w", names[j], ctx, err)
						}
					}
				}
				for j, r := range runs {
					res := r.result()
					res.Model = names[j]
					if rep.CopyBytesPerSecond > 0 {
						res.AttentionOfCopy = res.AttentionBytesPerSecond / rep.CopyBytesPerSecond
						res.WeightOfCopy = res.WeightBytesPerSecond / rep.CopyBytesPerSecond
					}
					rep.Results = append(rep.Results, res)
				}
				bar.Set(i+1, len(ctxs))
				if len(models) == 2 {
					a, b := rep.Results[len(rep.Results)-2], rep.Results[len(rep.Results)-1]
					rep.Ratios = append(rep.Ratios, benchRatio{Ctx: ctx,
						Decode:  b.DecodeTokensPerSecond / a.DecodeTokensPerSecond,
						Prefill: ratio(b.PrefillTokensPerSecond, a.PrefillTokensPerSecond),
						Cache:   float64(b.KVCacheBytesAllocated) / float64(a.KVCacheBytesAllocated)})
				}
			}
			bar.Done()
			rep.PeakRSSBytes = peakRSS()
			if c.Bool("json") {
				return writeJSON(c.App.Writer, rep)
			}
			printBench(c.App.Writer, rep)
			return nil
		},
	})
}

// benchSetup is one measurement's shape.
type benchSetup struct {
	ctx, batch, steps, chunk int
	dtype                    kernels.RowDType
	path                     eval.MLAPath
}

// ratio is a/b, 0 where b is 0 (no prefill at ctx 0).
func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// benchRun is one model's measurement at one ctx, prepared (prefilled and
// attention timed) and then decoded step by step.
type benchRun struct {
	res    benchResult
	runner *eval.Runner
	caches []*eval.KVCache
	rng    *rand.Rand
	vocab  int
	times  []float64
	// next and logits are the decode steps' buffers, reused.
	next   [][]int
	logits [][]float32
}

// prepareBench prefills one sequence of s.ctx tokens (timed), times the
// attention kernel alone on its cache and copies the cache to the batch's
// other sequences.
func prepareBench(ctx context.Context, m *model.Model, be kernels.Backend, s benchSetup) (*benchRun, error) {
	b := &benchRun{vocab: m.Config.VocabSize, rng: rand.New(rand.NewPCG(uint64(s.ctx), 1))}
	b.res = benchResult{Architecture: m.Config.Architecture, Ctx: s.ctx, Batch: s.batch, CacheDType: s.dtype.String(),
		BeyondTrainedPositions: m.Config.MaxPositionEmbeddings > 0 && s.ctx+s.steps > m.Config.MaxPositionEmbeddings}
	r, err := eval.NewRunnerWith(m, be, eval.Options{MaxPositions: s.ctx + s.steps, CacheDType: s.dtype, MLAPath: s.path})
	if err != nil {
		return nil, err
	}
	b.runner = r
	b.res.WeightBytesPerStep = r.WeightBytesPerToken()
	b.res.WeightDType = weightDType(m)
	first := r.NewCache()
	// Every page the decode steps need is there before they are timed.
	first.Reserve(s.ctx + s.steps)
	if s.ctx > 0 {
		start := time.Now()
		for done := 0; done < s.ctx; {
			n := min(s.chunk, s.ctx-done)
			toks := make([]int, n)
			for i := range toks {
				toks[i] = b.rng.IntN(b.vocab)
			}
			if _, err := r.Forward(ctx, first, toks, false); err != nil {
				return nil, err
			}
			done += n
		}
		b.res.PrefillTokensPerSecond = float64(s.ctx) / time.Since(start).Seconds()

		probe, bytes, err := r.AttentionProbe(first, 0)
		if err != nil {
			return nil, err
		}
		probe() // warm-up
		b.res.AttentionSeconds = median(9, probe)
		b.res.AttentionBytesPerSecond = float64(bytes) / b.res.AttentionSeconds
	}

	b.caches = []*eval.KVCache{first}
	for range s.batch - 1 {
		c := r.NewCache()
		c.Reserve(s.ctx + s.steps)
		if err := c.CopyFrom(first); err != nil {
			return nil, err
		}
		b.caches = append(b.caches, c)
	}
	b.next = make([][]int, s.batch)
	for i := range b.next {
		b.next[i] = make([]int, 1)
	}
	b.times = make([]float64, 0, s.steps)
	return b, nil
}

// weightDType names the dtypes the model's matrices are held in.
func weightDType(m *model.Model) string {
	if m.Embed != nil {
		return "f32"
	}
	return strings.ToLower(m.Embed16.DType.String())
}

// step decodes one token for every sequence of the batch and records the
// time.
func (b *benchRun) step(ctx context.Context) error {
	for i := range b.next {
		b.next[i][0] = b.rng.IntN(b.vocab)
	}
	t := time.Now()
	out, err := b.runner.ForwardBatchInto(ctx, b.caches, b.next, false, b.logits)
	if err != nil {
		return err
	}
	b.times = append(b.times, time.Since(t).Seconds())
	b.logits = out
	return nil
}

// result completes the measurement: median step time and the cache the
// batch holds.
func (b *benchRun) result() benchResult {
	res := b.res
	times := slices.Clone(b.times)
	slices.Sort(times)
	res.DecodeStepSeconds = times[len(times)/2]
	res.DecodeTokensPerSecond = float64(res.Batch) / res.DecodeStepSeconds
	res.WeightBytesPerSecond = float64(res.WeightBytesPerStep) / res.DecodeStepSeconds
	for _, c := range b.caches {
		res.KVCacheBytesAllocated += c.BytesAllocated()
	}
	res.KVCacheBytesPerToken = b.caches[0].RowBytes()
	return res
}

// median runs f n times and returns the median duration in seconds.
func median(n int, f func()) float64 {
	t := make([]float64, n)
	for i := range t {
		start := time.Now()
		f()
		t[i] = time.Since(start).Seconds()
	}
	slices.Sort(t)
	return t[n/2]
}

// copyBandwidth is the median rate of copying 64 MiB (twice the L3 cache
// of the development machine) with one goroutine per core, in bytes read
// plus written per second.
func copyBandwidth() float64 {
	const size = 16 << 20 // float32s
	src, dst := make([]float32, size), make([]float32, size)
	for i := range src {
		src[i] = float32(i)
	}
	workers := runtime.GOMAXPROCS(0)
	run := func() {
		var wg sync.WaitGroup
		for w := range workers {
			lo, hi := size*w/workers, size*(w+1)/workers
			wg.Add(1)
			go func() {
				defer wg.Done()
				copy(dst[lo:hi], src[lo:hi])
			}()
		}
		wg.Wait()
	}
	run()
	return 2 * 4 * size / median(5, run)
}

// checkCacheDType refuses an unknown --cache-dtype before any model is
// read; cacheDType resolves it once the model is loaded.
func checkCacheDType(name string) error {
	if name == "model" {
		return nil
	}
	if _, err := kernels.ParseRowDType(name); err != nil {
		return usageError{fmt.Errorf("--cache-dtype: %w", err)}
	}
	return nil
}

// cacheDType maps --cache-dtype to a row dtype; "model" follows the
// checkpoint's stored dtype.
func cacheDType(name string, m *model.Model) (kernels.RowDType, error) {
	if name != "model" {
		dt, err := kernels.ParseRowDType(name)
		if err != nil {
			return 0, usageError{fmt.Errorf("--cache-dtype: %w", err)}
		}
		return dt, nil
	}
	switch m.StorageDType {
	case safetensors.BF16:
		return kernels.RowBF16, nil
	case safetensors.F16:
		return kernels.RowF16, nil
	}
	return kernels.RowF32, nil
}

func parseInts(list string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(list, ",") {
		v, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || v < 0 {
			return nil, fmt.Errorf("%q is not a whole number of at least 0", f)
		}
		out = append(out, v)
	}
	return out, nil
}

func printBench(w io.Writer, rep benchReport) {
	fmt.Fprintf(w, "%-40s %7s %5s %12s %13s %10s %10s %8s %9s %8s\n", "model", "ctx", "batch", "decode tok/s", "prefill tok/s", "KV cache",
		"wt GB/s", "of copy", "attn GB/s", "of copy")
	for _, r := range rep.Results {
		name := r.Model
		if len(name) > 40 {
			name = "…" + name[len(name)-39:]
		}
		mark := ""
		if r.BeyondTrainedPositions {
			mark = " *"
		}
		prefill, attn, attnOf := "-", "-", "-"
		if r.Ctx > 0 {
			prefill = fmt.Sprintf("%.0f", r.PrefillTokensPerSecond)
			attn, attnOf = fmt.Sprintf("%.1f", r.AttentionBytesPerSecond/1e9), fmt.Sprintf("%.0f%%", 100*r.AttentionOfCopy)
		}
		fmt.Fprintf(w, "%-40s %7d %5d %12.1f %13s %10s %10.1f %7.0f%% %9s %8s%s\n", name, r.Ctx, r.Batch, r.DecodeTokensPerSecond,
			prefill, humanBytes(r.KVCacheBytesAllocated), r.WeightBytesPerSecond/1e9, 100*r.WeightOfCopy, attn, attnOf, mark)
	}
	for _, r := range rep.Ratios {
		if r.Prefill == 0 {
			fmt.Fprintf(w, "ctx %d: second model decode ×%.2f, KV cache ×%.2f\n", r.Ctx, r.Decode, r.Cache)
			continue
		}
		fmt.Fprintf(w, "ctx %d: second model decode ×%.2f, prefill ×%.2f, KV cache ×%.2f\n", r.Ctx, r.Decode, r.Prefill, r.Cache)
	}
	fmt.Fprintf(w, "memory copy %.1f GB/s (read + write); wt: weight bytes of a decode step / median step time; %s backend, %d threads, MLA path %s; peak RSS %s\n",
		rep.CopyBytesPerSecond/1e9, rep.Backend, rep.Threads, rep.MLAPath, humanBytes(rep.PeakRSSBytes))
	for _, r := range rep.Results {
		if r.BeyondTrainedPositions {
			fmt.Fprintln(w, "* beyond the model's trained positions: speed only")
			break
		}
	}
}
