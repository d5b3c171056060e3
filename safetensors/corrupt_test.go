package safetensors

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A file that shrinks after Open (another process truncating or
// overwriting it in place) must make reads fail with an error naming the
// tensor and file; with a memory mapping the access would otherwise raise
// SIGBUS and crash the program.
func TestFileShrinksWhileOpen(t *testing.T) {
	bothPaths(t, func(t *testing.T, open func(string) (*Checkpoint, error)) {
		dir := t.TempDir()
		data := make([]float32, 1<<18) // 1 MiB as F32, many pages
		for i := range data {
			data[i] = float32(i)
		}
		specs := []TensorSpec{Float32Tensor("w", F32, []int{len(data)}, data)}
		if err := WriteCheckpoint(context.Background(), dir, specs, WriteOptions{}); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "model.safetensors")
		c, err := open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := os.Truncate(path, 4096); err != nil {
			t.Fatal(err)
		}
		for _, read := range []func() error{
			func() error { _, err := c.Float32("w"); return err },
			func() error { return c.ReadFloat32("w", make([]float32, len(data))) },
			func() error {
				// The callback reads every byte, as a finiteness check does.
				var sum byte
				return c.ReadStored("w", func(b []byte, _ int) error {
					for _, v := range b {
						sum += v
					}
					return nil
				})
			},
		} {
			err := read()
			t.Logf("error: %v", err)
			if err == nil || !strings.Contains(err.Error(), `tensor "w"`) || !strings.Contains(err.Error(), path) {
				t.Errorf("reading a tensor past the new end of the file: %v, want an error naming the tensor and file", err)
			}
		}
	})
}
