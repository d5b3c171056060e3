package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/convert"
	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/tokenizer"
)

// demoText is the built-in evaluation text of the demo, written for this project.
const demoText = `A language model that reads a long document keeps, for every token it has seen,
a key and a value in each attention layer. This cache grows with the length of the
context and soon outweighs the model itself. Grouped-query attention shares one key
and one value among several query heads and so divides the cache by the size of a
group. Multi-head latent attention goes further: it stores a single short latent
vector per token, from which the keys and values of every head are rebuilt, plus a
small key that carries the rotary position. A converted model keeps its weights but
caches a fraction of what it cached before. The price is an approximation, and the
point of measuring perplexity before and after is to know how large that price is.
Rotary position embeddings rotate pairs of coordinates by an angle that grows with
the position of the token. Because the rotation is applied after the projection, it
cannot be folded into a shared latent, which is why the position information has to
travel in a separate key. Within one frequency, a rotation of the pairs commutes with
any orthogonal mixing across heads, and that freedom lets a converter collect most of
the positional energy into a few dimensions. The rest of the key, now free of
position, joins the value in the latent, and a low-rank factorization decides what
is kept. Calibration text shows which directions the activations really use.
`

// demoRank is the demo's kv_lora_rank: with the synthetic model's 2 KV heads
// of 32 dims and a RoPE key of 32, it halves the KV cache.
const demoRank = 32

func demoCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:  "demo",
		Usage: "the main job on the built-in default: synthesize a small GQA checkpoint, convert it to MLA, compare before and after",
		Description: `Needs no downloads: writes the deterministic synthetic checkpoint of
"transmla synth" (to --dir, or a temporary directory removed afterwards), converts it
with "transmla convert --dc 32" (data-free; the built-in text is for evaluation only),
evaluates both on a built-in text and prints perplexity and KV cache before and after.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Usage: "keep the synthetic checkpoint in DIR and the converted one in DIR-mla (existing ones need --force)"},
			&cli.BoolFlag{Name: "force", Usage: "replace --dir and DIR-mla if they exist"},
			&cli.IntFlag{Name: "ctx", Usage: "eval window length", Value: 128},
		},
		Action: func(c *cli.Context) error {
			w := c.App.Writer
			dir, force := c.String("dir"), c.Bool("force")
			if dir == "" {
				force = true // a fresh temporary directory
				tmp, err := os.MkdirTemp("", "transmla-demo")
				if err != nil {
					return fmt.Errorf("demo: %w", err)
				}
				defer os.RemoveAll(tmp)
				dir = filepath.Join(tmp, "synthetic-gqa")
			}
			ctx := c.Int("ctx")
			// Checked before anything is written: the synthetic checkpoint's
			// tokenizer is the built-in byte-level one.
			tokJSON, err := syntheticTokenizer()
			if err != nil {
				return err
			}
			demoTok, err := tokenizer.Parse("built-in tokenizer", tokJSON)
			if err != nil {
				return err
			}
			if ids := len(demoTok.Encode(demoText, true)); ctx < 2 || ctx > ids {
				return usagef("--ctx must be in [2, %d], the built-in text's token count; got %d", ids, ctx)
			}
			// Both checked before either is written.
			mlaDir := filepath.Clean(dir) + "-mla"
			for _, d := range []string{dir, mlaDir} {
				if err := checkOutputDir(d, force); err != nil {
					return err
				}
			}
			if err := writeSynthetic(c.Context, dir, model.DefaultSynthetic(), force); err != nil {
				return err
			}
			fmt.Fprintf(w, "== synthetic GQA checkpoint written to %s\n", dir)
			rep, err := inspect(dir)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "%s: %d layers, %d query heads × %d, %d KV heads, %.2fM parameters (%s)\n",
				rep.Architecture, rep.Layers, rep.Heads, rep.HeadDim, rep.KVHeads, float64(rep.Parameters)/1e6, rep.DType)
			be, err := backendFor(c)
			if err != nil {
				return err
			}
			cfg, err := model.LoadConfig(dir)
			if err != nil {
				return err
			}

			fmt.Fprintf(w, "== transmla convert %s --dc %d -o %s\n", dir, demoRank, mlaDir)
			sum, err := convert.Run(c.Context, convert.Job{
				Source: dir, Output: mlaDir, Force: true, Backend: be, Version: version,
				Options: convert.DefaultOptions(cfg, demoRank),
			})
			if err != nil {
				return fmt.Errorf("convert %s: %w", dir, err)
			}
			fmt.Fprintf(w, "%s, %.1f s\n", sum.Method, sum.Seconds)

			type result struct {
				ppl, tps    float64
				cacheValues int
				cacheBytes  int64
				generated   []int
			}
			measure := func(path string) (result, error) {
				m, tok, err := loadModel(c.Context, path, c.App.ErrWriter)
				if err != nil {
					return result{}, err
				}
				ids := tok.Encode(demoText, true)
				runner, err := eval.NewRunner(m, be, max(ctx, 64))
				if err != nil {
					return result{}, err
				}
				res, err := eval.Perplexity(c.Context, runner, ids, eval.PerplexityOptions{Ctx: ctx})
				if err != nil {
					return result{}, err
				}
				out, err := eval.Greedy(c.Context, runner, tok.Encode("The cache", true), eval.GenerateOptions{MaxTokens: 16})
				if err != nil {
					return result{}, err
				}
				return result{res.PPL, res.TokensPerSecond, m.Config.KVCacheValuesPerToken(), m.KVCacheBytesPerToken(), out}, nil
			}
			before, err := measure(dir)
			if err != nil {
				return err
			}
			after, err := measure(mlaDir)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "== before and after, on the built-in text (ctx %d)\n", ctx)
			fmt.Fprintf(w, "%-26s %14s %14s\n", "", "GQA (before)", "MLA (after)")
			fmt.Fprintf(w, "%-26s %14.4f %14.4f\n", "perplexity", before.ppl, after.ppl)
			fmt.Fprintf(w, "%-26s %14d %14d\n", "KV cache values/token", before.cacheValues, after.cacheValues)
			fmt.Fprintf(w, "%-26s %14s %14s\n", "KV cache bytes/token", humanBytes(before.cacheBytes), humanBytes(after.cacheBytes))
			fmt.Fprintf(w, "%-26s %29.1f%%\n", "cache reduction", 100*sum.Reduction)
			fmt.Fprintf(w, "%-26s %14.0f %14.0f\n", "eval tokens/s", before.tps, after.tps)
			fmt.Fprintf(w, "(random weights: guessing uniformly over the vocabulary would give ppl %d)\n", rep.Vocab)
			fmt.Fprintf(w, "greedy ids before: %v\ngreedy ids after:  %v\n", before.generated, after.generated)
			return nil
		},
	})
}
