package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/eval"
)

func generateCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:      "generate",
		Usage:     "greedy (argmax) continuation of a prompt, with a KV cache",
		ArgsUsage: "MODEL",
		Description: `Encodes --prompt with the model's tokenizer (adding the BOS its post-processor
adds; with an empty prompt and no such BOS, config.json's bos_token_id is used),
then decodes greedily until --max-tokens or an EOS token.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "prompt", Usage: "text to continue"},
			&cli.IntFlag{Name: "max-tokens", Usage: "new tokens to generate at most", Value: 64},
			&cli.BoolFlag{Name: "ids", Usage: "print the new token ids as a JSON array instead of text"},
			&cli.BoolFlag{Name: "ignore-eos", Usage: "keep generating after an EOS token"},
			&cli.StringFlag{Name: "cache-dtype", Usage: "KV cache storage: bf16, f16, f32, or model (the checkpoint's dtype, as serving engines keep it)", Value: "model"},
		},
		Action: func(c *cli.Context) error {
			if c.Int("max-tokens") < 1 {
				return usagef("--max-tokens must be at least 1, got %d", c.Int("max-tokens"))
			}
			if err := checkCacheDType(c.String("cache-dtype")); err != nil {
				return err
			}
			dir, err := modelArg(c)
			if err != nil {
				return err
			}
			m, tok, err := loadModel(c.Context, dir, c.App.ErrWriter)
			if err != nil {
				return err
			}
			prompt := tok.Encode(c.String("prompt"), true)
			if len(prompt) == 0 {
				if m.Config.BOSTokenID < 0 {
					return usagef("empty --prompt and the model defines no BOS token: give a prompt")
				}
				prompt = []int{m.Config.BOSTokenID}
			}
			// The cache is sized up front, so the length is bounded first.
			limit := m.Config.MaxPositionEmbeddings
			if limit <= 0 {
				limit = 1 << 20
			}
			if n := c.Int("max-tokens"); n > limit-len(prompt) {
				return usagef("--max-tokens %d with a %d-token prompt exceeds the model's %d positions", n, len(prompt), limit)
			}
			be, err := backendFor(c)
			if err != nil {
				return err
			}
			dt, err := cacheDType(c.String("cache-dtype"), m)
			if err != nil {
				return err
			}
			// MLA checkpoints decode on their latent cache with the absorbed
			// kernel (eval.PathAuto picks it for single tokens).
			runner, err := eval.NewRunnerWith(m, be, eval.Options{MaxPositions: len(prompt) + c.Int("max-tokens"), CacheDType: dt})
			if err != nil {
				return err
			}
			opt := eval.GenerateOptions{MaxTokens: c.Int("max-tokens")}
			if !c.Bool("ignore-eos") {
				opt.StopIDs = m.Config.EOSTokenIDs
			}
			out, err := eval.Greedy(c.Context, runner, prompt, opt)
			if err != nil {
				return err
			}
			if c.Bool("ids") {
				return writeJSONLine(c.App.Writer, out)
			}
			fmt.Fprintln(c.App.Writer, tok.Decode(append(prompt, out...), true))
			return nil
		},
	})
}
