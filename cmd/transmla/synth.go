package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/internal/atomicfile"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/safetensors"
	"github.com/transmla/transmla/tokenizer"
)

// synthShapes are synth's --shape presets.
var synthShapes = map[string]func() model.SyntheticSpec{
	"tiny":      model.DefaultSynthetic,
	"llama3-8b": func() model.SyntheticSpec { return model.SyntheticLlama8B(32) },
}

func synthCommand() *cli.Command {
	def := model.DefaultSynthetic()
	return withUsageErrors(&cli.Command{
		Name:      "synth",
		Usage:     "write a deterministic synthetic GQA checkpoint (small by default, or Llama-3-8B-shaped)",
		ArgsUsage: " ",
		Description: `Writes config.json, model safetensors and a byte-level tokenizer.json to -o.
The same flags always give the same bytes. The weights are random, so the model's
text is noise, but every command runs on it.

--shape tiny (the default) is the built-in model: Gaussian weights with decaying
per-row scales. --shape llama3-8b has Llama-3-8B's sizes (hidden 4096, 32 query
and 8 KV heads of 128, MLP 14336, vocabulary 128256, 32 layers unless --layers)
and attention projections with the decaying, head-overlapping spectra of trained
models, for measuring conversions at real scale; each layer is 0.44 GB in bf16
and the embeddings 2.1 GB. Size flags given explicitly override the preset.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "directory to create (required)"},
			&cli.BoolFlag{Name: "force", Usage: "replace an existing output directory"},
			&cli.StringFlag{Name: "shape", Value: "tiny", Usage: "preset: tiny or llama3-8b"},
			&cli.IntFlag{Name: "layers", Value: def.Layers},
			&cli.IntFlag{Name: "hidden", Value: def.Hidden},
			&cli.IntFlag{Name: "heads", Value: def.Heads},
			&cli.IntFlag{Name: "kv-heads", Value: def.KVHeads},
			&cli.IntFlag{Name: "head-dim", Value: def.HeadDim},
			&cli.IntFlag{Name: "intermediate", Value: def.Intermediate},
			&cli.BoolFlag{Name: "qkv-bias", Usage: "add q/k/v biases (writes a Qwen2 config)"},
			&cli.StringFlag{Name: "dtype", Usage: "bf16, f16 or f32", Value: "bf16"},
			&cli.Uint64Flag{Name: "seed", Value: def.Seed},
		},
		Action: func(c *cli.Context) error {
			if err := requireFlags(c, "output"); err != nil {
				return err
			}
			preset, ok := synthShapes[c.String("shape")]
			if !ok {
				return usagef("--shape must be tiny or llama3-8b, got %q", c.String("shape"))
			}
			spec := preset()
			for _, f := range []struct {
				name string
				dst  *int
			}{{"layers", &spec.Layers}, {"hidden", &spec.Hidden}, {"heads", &spec.Heads}, {"kv-heads", &spec.KVHeads}, {"head-dim", &spec.HeadDim}, {"intermediate", &spec.Intermediate}} {
				if c.IsSet(f.name) {
					*f.dst = c.Int(f.name)
				}
			}
			if c.IsSet("seed") {
				spec.Seed = c.Uint64("seed")
			}
			spec.QKVBias = c.Bool("qkv-bias")
			dt, ok := map[string]safetensors.DType{"bf16": safetensors.BF16, "f16": safetensors.F16, "f32": safetensors.F32}[c.String("dtype")]
			if !ok {
				return usagef("--dtype must be bf16, f16 or f32, got %q", c.String("dtype"))
			}
			spec.DType = dt
			for _, v := range []int{spec.Layers, spec.Hidden, spec.Heads, spec.KVHeads, spec.HeadDim, spec.Intermediate} {
				if v <= 0 {
					return usagef("model sizes must be positive")
				}
			}
			if err := writeSynthetic(c.Context, c.String("output"), spec, c.Bool("force")); err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "wrote %s\n", c.String("output"))
			return nil
		},
	})
}

// syntheticTokenizer is the tokenizer.json written beside synthetic
// checkpoints: byte-level, with one end-of-text special.
func syntheticTokenizer() ([]byte, error) { return tokenizer.ByteLevelJSON("<|endoftext|>") }

// writeSynthetic builds the checkpoint in a temporary sibling directory and
// renames it into place, so dir is either absent, the old one, or complete
// (see atomicfile.CommitDir, also for a dir that is a symbolic link).
func writeSynthetic(ctx context.Context, dir string, spec model.SyntheticSpec, force bool) error {
	if err := checkOutputDir(dir, force); err != nil {
		return err
	}
	tmp, err := atomicfile.TempDir(dir)
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp) // no-op once renamed
	if err := model.WriteSynthetic(ctx, tmp, spec); err != nil {
		return err
	}
	tokJSON, err := syntheticTokenizer()
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(tmp, "tokenizer.json"), tokJSON, 0o644); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return fmt.Errorf("create output: %w", err)
	}
	if err := atomicfile.SyncDir(tmp); err != nil {
		return err
	}
	if err := atomicfile.CommitDir(tmp, dir, force); errors.Is(err, atomicfile.ErrOutputExists) {
		return usagef("output %s appeared meanwhile; pass --force to replace it", dir)
	} else if err != nil {
		return err
	}
	return nil
}

// checkOutputDir refuses an output directory that exists without force
// (a usage error) or is not a directory (a failed run).
func checkOutputDir(dir string, force bool) error {
	_, exists, err := atomicfile.OutputDir(dir)
	if err != nil {
		return err
	}
	if exists && !force {
		return usagef("output %s exists; pass --force to replace it", dir)
	}
	return nil
}
