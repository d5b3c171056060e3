package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
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

func demoCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:  "demo",
		Usage: "the main job on the built-in default: synthesize a small GQA checkpoint, inspect, evaluate and generate",
		Description: `Needs no downloads: writes the deterministic synthetic checkpoint of
"transmla synth" (to --dir, or a temporary directory removed afterwards), then runs
inspect, eval on a built-in text and generate on it.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Usage: "keep the synthetic checkpoint in this directory (an existing one needs --force)"},
			&cli.BoolFlag{Name: "force", Usage: "replace --dir if it exists"},
			&cli.IntFlag{Name: "ctx", Usage: "eval window length", Value: 128},
		},
		Action: func(c *cli.Context) error {
			w := c.App.Writer
			dir, force := c.String("dir"), c.Bool("force")
			if dir == "" {
				force = true // a fresh temporary directory
				tmp, err := os.MkdirTemp("", "transmla-demo")
				if err != nil {
					return err
				}
				defer os.RemoveAll(tmp)
				dir = filepath.Join(tmp, "synthetic-gqa")
			}
			if err := writeSynthetic(c.Context, dir, model.DefaultSynthetic(), force); err != nil {
				return err
			}
			fmt.Fprintf(w, "== synthetic checkpoint written to %s\n", dir)
			rep, err := inspect(dir)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "%s: %d layers, %d query heads × %d, %d KV heads, %.2fM parameters (%s)\n",
				rep.Architecture, rep.Layers, rep.Heads, rep.HeadDim, rep.KVHeads, float64(rep.Parameters)/1e6, rep.DType)
			fmt.Fprintf(w, "KV cache: %d values = %d B per token\n", rep.KVCacheValuesPerToken, rep.KVCacheBytesPerToken)

			m, tok, err := loadModel(c.Context, dir, c.App.ErrWriter)
			if err != nil {
				return err
			}
			ctx := c.Int("ctx")
			ids := tok.Encode(demoText, true)
			if ctx < 2 || ctx > len(ids) {
				return usagef("--ctx must be in [2, %d], the built-in text's token count; got %d", len(ids), ctx)
			}
			runner, err := eval.NewRunner(m, kernels.Gonum{}, max(ctx, 64))
			if err != nil {
				return err
			}
			res, err := eval.Perplexity(c.Context, runner, ids, eval.PerplexityOptions{Ctx: ctx})
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "== eval on the built-in text (%d tokens, ctx %d)\n", len(ids), ctx)
			fmt.Fprintf(w, "ppl %.4f over %d scored tokens in %d windows, %.0f tokens/s\n", res.PPL, res.TokensScored, res.Windows, res.TokensPerSecond)
			fmt.Fprintf(w, "(random weights; guessing uniformly over the vocabulary would give %d)\n", m.Config.VocabSize)

			prompt := tok.Encode("The cache", true)
			out, err := eval.Greedy(c.Context, runner, prompt, eval.GenerateOptions{MaxTokens: 16})
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "== greedy continuation ids: %v\n", out)
			return nil
		},
	})
}
