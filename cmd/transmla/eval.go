package main

import (
	"fmt"
	"runtime"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/eval"
)

// evalReport is the --json output of eval.
type evalReport struct {
	Model        string `json:"model"`
	Architecture string `json:"architecture"`
	Data         string `json:"data"`
	eval.PerplexityResult
	KVCacheValuesPerToken int    `json:"kv_cache_values_per_token"`
	KVCacheBytesPerToken  int64  `json:"kv_cache_bytes_per_token"`
	KVCacheBytesAtCtx     int64  `json:"kv_cache_bytes_at_ctx"`
	KVCacheDType          string `json:"kv_cache_dtype"`
	// CacheDTypeUsed is the dtype this run's cache held its rows in; its
	// bytes are PerplexityResult.KVCacheBytesAllocated.
	CacheDTypeUsed string `json:"kv_cache_dtype_used"`
	MLAPath        string `json:"mla_path,omitempty"`
	Backend        string `json:"backend"`
	Threads        int    `json:"threads"`
	// WeightDType is the dtype the model's matrices are held in (the
	// checkpoint's bf16 or f16, else f32).
	WeightDType string `json:"weight_dtype"`
	// PeakRSSBytes is the process's peak resident set size at the end.
	PeakRSSBytes int64 `json:"peak_rss_bytes"`
}

func evalCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:      "eval",
		Usage:     "perplexity, throughput and KV-cache size of a checkpoint on a text file",
		ArgsUsage: "MODEL",
		Description: `Tokenizes --data with the model's tokenizer.json (special tokens only where its
post-processor adds them), cuts it into non-overlapping windows of --ctx tokens
(dropping the partial tail), runs every window from an empty cache and scores
positions 1..ctx-1; ppl = exp(mean NLL). MODEL is a Hugging Face checkpoint
directory (config.json, tokenizer.json, *.safetensors, single or sharded).`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "data", Usage: "text file to score (required; e.g. wiki.test.raw)"},
			&cli.IntFlag{Name: "ctx", Usage: "window length in tokens", Value: 1024},
			&cli.IntFlag{Name: "max-windows", Usage: "score at most N windows (0 = all)"},
			&cli.StringFlag{Name: "cache-dtype", Usage: "KV cache storage: f32 (the reference protocol), bf16, f16, or model (the checkpoint's dtype)", Value: "f32"},
			&cli.StringFlag{Name: "mla-path", Usage: "MLA attention: auto (the cheaper per shape), absorbed (W_UK/W_UV folded, attention on the latent cache) or decompressed (per-head K/V rebuilt)", Value: "auto"},
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object instead of text"},
		},
		Action: func(c *cli.Context) error {
			if err := requireFlags(c, "data"); err != nil {
				return err
			}
			if c.Int("ctx") < 2 {
				return usagef("--ctx must be at least 2, got %d", c.Int("ctx"))
			}
			if c.Int("max-windows") < 0 {
				return usagef("--max-windows must not be negative")
			}
			path, err := eval.ParseMLAPath(c.String("mla-path"))
			if err != nil {
				return usageError{err}
			}
			if err := checkCacheDType(c.String("cache-dtype")); err != nil {
				return err
			}
			dir, err := modelArg(c)
			if err != nil {
				return err
			}
			text, err := readData(c)
			if err != nil {
				return err
			}
			m, tok, err := loadModel(c.Context, dir, c.App.ErrWriter)
			if err != nil {
				return err
			}
			ids := tok.Encode(text, true)
			if err := checkContext(m.Config, c.Int("ctx"), len(ids)); err != nil {
				return err
			}
			be, err := backendFor(c)
			if err != nil {
				return err
			}
			dt, err := cacheDType(c.String("cache-dtype"), m)
			if err != nil {
				return err
			}
			runner, err := eval.NewRunnerWith(m, be, eval.Options{MaxPositions: c.Int("ctx"), CacheDType: dt, MLAPath: path})
			if err != nil {
				return err
			}
			bar := newProgress(c.App.ErrWriter, 1, "scoring windows")
			res, err := eval.Perplexity(c.Context, runner, ids, eval.PerplexityOptions{
				Ctx: c.Int("ctx"), MaxWindows: c.Int("max-windows"), Progress: bar.Set,
			})
			bar.Done()
			if err != nil {
				return fmt.Errorf("eval %s on %s: %w", dir, c.String("data"), err)
			}
			rep := evalReport{
				Model: dir, Architecture: m.Config.Architecture, Data: c.String("data"),
				PerplexityResult:      res,
				KVCacheValuesPerToken: m.Config.KVCacheValuesPerToken(),
				KVCacheBytesPerToken:  m.KVCacheBytesPerToken(),
				KVCacheBytesAtCtx:     m.KVCacheBytesPerToken() * int64(res.Ctx),
				KVCacheDType:          m.StorageDType.String(),
				CacheDTypeUsed:        dt.String(),
				MLAPath:               path.String(),
				Backend:               be.Name(),
				Threads:               runtime.GOMAXPROCS(0),
				WeightDType:           weightDType(m),
				PeakRSSBytes:          peakRSS(),
			}
			if c.Bool("json") {
				return writeJSON(c.App.Writer, rep)
			}
			w := c.App.Writer
			fmt.Fprintf(w, "model       %s (%s)\n", dir, rep.Architecture)
			fmt.Fprintf(w, "data        %s: %d tokens\n", rep.Data, res.TokensInFile)
			fmt.Fprintf(w, "ppl         %.4f (mean NLL %.6f)\n", res.PPL, res.MeanNLL)
			fmt.Fprintf(w, "scored      %d tokens in %d windows of %d\n", res.TokensScored, res.Windows, res.Ctx)
			fmt.Fprintf(w, "throughput  %.0f tokens/s (%.1f s, %s backend, %d threads, %s weights, peak RSS %s)\n", res.TokensPerSecond, res.Seconds, rep.Backend, rep.Threads,
				rep.WeightDType, humanBytes(rep.PeakRSSBytes))
			fmt.Fprintf(w, "KV cache    %d values = %d B per token (%s); %s at ctx %d\n",
				rep.KVCacheValuesPerToken, rep.KVCacheBytesPerToken, rep.KVCacheDType, humanBytes(rep.KVCacheBytesAtCtx), res.Ctx)
			fmt.Fprintf(w, "this run    %s cache allocated (%s rows)", humanBytes(res.KVCacheBytesAllocated), rep.CacheDTypeUsed)
			if m.Config.MLA != nil {
				fmt.Fprintf(w, ", MLA attention %s", rep.MLAPath)
			}
			fmt.Fprintln(w)
			return nil
		},
	})
}
