// Package synthtest writes the project's synthetic checkpoints for the
// tests of other packages.
package synthtest

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/tokenizer"
)

// Checkpoint writes a synthetic checkpoint of spec, with the byte-level
// tokenizer that `transmla synth` writes beside it, into a new directory
// named gqa under t's temporary directory, and returns that directory.
func Checkpoint(t testing.TB, spec model.SyntheticSpec) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "gqa")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := model.WriteSynthetic(context.Background(), dir, spec); err != nil {
		t.Fatal(err)
	}
	tokJSON, err := tokenizer.ByteLevelJSON("<|endoftext|>")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "tokenizer.json"), tokJSON, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}
