package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/tokenizer"
)

// modelDir resolves a MODEL argument (a directory, or a file inside one).
func modelDir(arg string) (string, error) {
	st, err := os.Stat(arg)
	if err != nil {
		return "", fmt.Errorf("model %s: %w", arg, err)
	}
	if st.IsDir() {
		return arg, nil
	}
	return filepath.Dir(arg), nil
}

// modelArg checks that the command got exactly one MODEL argument and
// resolves it to a checkpoint directory.
func modelArg(c *cli.Context) (string, error) {
	if c.NArg() != 1 {
		return "", usagef("%s needs exactly one MODEL argument, got %d", c.Command.Name, c.NArg())
	}
	return modelDir(c.Args().First())
}

// gqaSource resolves the command's MODEL argument and reads its config,
// refusing an MLA checkpoint: convert and sweep read GQA ones. That is bad
// input rather than bad usage (exit 1), found before the options are
// validated against the config.
func gqaSource(c *cli.Context) (string, model.Config, error) {
	dir, err := modelArg(c)
	if err != nil {
		return "", model.Config{}, err
	}
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		return "", model.Config{}, err
	}
	if cfg.MLA != nil {
		return "", model.Config{}, fmt.Errorf("%s is already MLA (%s); %s reads GQA checkpoints", dir, cfg.Architecture, c.Command.Name)
	}
	return dir, cfg, nil
}

// loadModel reads the checkpoint in dir and its tokenizer, with a progress bar.
func loadModel(ctx context.Context, dir string, stderr io.Writer) (*model.Model, *tokenizer.Tokenizer, error) {
	tok, err := loadTokenizer(dir)
	if err != nil {
		return nil, nil, err
	}
	m, err := loadWeights(ctx, dir, stderr)
	return m, tok, err
}

// loadWeights reads the checkpoint in dir, with a progress bar; commands
// that feed token ids of their own need no tokenizer. bf16 and f16
// matrices stay in their stored dtype: half the memory of float32, and
// what the kernels read fastest (they widen exactly).
func loadWeights(ctx context.Context, dir string, stderr io.Writer) (*model.Model, error) {
	p := newProgress(stderr, 1, "loading weights")
	defer p.Done()
	return model.LoadWith(ctx, dir, model.LoadOptions{KeepDType: true, Progress: p.Set})
}

// checkContext rejects a window longer than the model's trained context
// or than the data, before anything is sized by it.
func checkContext(cfg model.Config, ctx, tokens int) error {
	if cfg.MaxPositionEmbeddings > 0 && ctx > cfg.MaxPositionEmbeddings {
		return usagef("--ctx %d exceeds the model's max_position_embeddings %d", ctx, cfg.MaxPositionEmbeddings)
	}
	if tokens < ctx {
		return fmt.Errorf("the data has %d tokens, fewer than one window of --ctx %d", tokens, ctx)
	}
	return nil
}

// readData reads the --data file.
func readData(c *cli.Context) (string, error) {
	text, err := os.ReadFile(c.String("data"))
	if err != nil {
		return "", fmt.Errorf("read --data: %w", err)
	}
	return string(text), nil
}

func loadTokenizer(dir string) (*tokenizer.Tokenizer, error) {
	path := filepath.Join(dir, "tokenizer.json")
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("model %s has no tokenizer.json (only Hugging Face tokenizer.json is supported): %w", dir, err)
	}
	return tokenizer.Load(path)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// humanBytes formats n with binary units.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// writeJSONLine prints v as compact JSON on one line.
func writeJSONLine(w io.Writer, v any) error {
	return json.NewEncoder(w).Encode(v)
}

// requireFlags reports a usage error for each named flag that is not set.
func requireFlags(c *cli.Context, names ...string) error {
	for _, n := range names {
		if !c.IsSet(n) {
			return usagef("%s: --%s is required (see transmla %s --help)", c.Command.Name, n, c.Command.Name)
		}
	}
	return nil
}

// backendFor returns the compute backend the global --blas flag selects.
func backendFor(c *cli.Context) (kernels.Backend, error) {
	be, err := kernels.Select(c.String("blas"))
	if err != nil {
		return nil, usageError{fmt.Errorf("--blas: %w", err)}
	}
	return be, nil
}
