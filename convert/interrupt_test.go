package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/transmla/transmla/internal/desttest"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/safetensors"
)

// budgetWriter passes writes through until its shared budget of bytes is
// spent; the write that would exceed it calls spent, which returns the
// error to fail with (nil lets the write through).
type budgetWriter struct {
	w     io.Writer
	left  *int64
	spent func() error
}

func (b budgetWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > *b.left {
		if err := b.spent(); err != nil {
			return 0, err
		}
	}
	*b.left -= int64(len(p))
	return b.w.Write(p)
}

// snapshot returns the files of dir by name, or nil if dir does not exist.
func snapshot(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	files := make(map[string][]byte)
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		files[e.Name()] = data
	}
	return files
}

func sameFiles(a, b map[string][]byte) bool {
	if len(a) != len(b) || (a == nil) != (b == nil) {
		return false
	}
	for name, data := range a {
		if other, ok := b[name]; !ok || !bytes.Equal(data, other) {
			return false
		}
	}
	return true
}

// A write that fails part way (a full disk) or a cancellation while
// writing leaves the output as it was, absent or the previous complete
// one, and nothing else beside it.
func TestRunFailedWriteLeavesOutputAsItWas(t *testing.T) {
	src := writeSynthetic(t)
	opts := Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightAttention, Rank: 32}
	// The size of the tensors the interrupted conversion writes.
	full := filepath.Join(t.TempDir(), "full")
	if _, err := Run(context.Background(), Job{Source: src, Output: full, Options: opts}); err != nil {
		t.Fatal(err)
	}
	c, err := safetensors.Open(full)
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, name := range c.Names() {
		info, _ := c.Info(name)
		total += info.Bytes
	}
	c.Close()

	for _, previous := range []bool{false, true} {
		for _, budget := range []int64{0, 1, 1 << 20, total / 2, total - 1} {
			for _, cancelled := range []bool{false, true} {
				name := fmt.Sprintf("previous=%v/budget=%d/cancelled=%v", previous, budget, cancelled)
				t.Run(name, func(t *testing.T) {
					parent := t.TempDir()
					out := filepath.Join(parent, "out")
					if previous {
						prev := with(opts, func(o *Options) { o.Rank = 48 })
						if _, err := Run(context.Background(), Job{Source: src, Output: out, Options: prev}); err != nil {
							t.Fatal(err)
						}
					}
					before := snapshot(t, out)
					ctx, cancel := context.WithCancel(context.Background())
					defer cancel()
					left := budget
					spent := func() error { return syscall.ENOSPC }
					if cancelled {
						spent = func() error { cancel(); return nil }
					}
					job := Job{Source: src, Output: out, Force: true, Options: opts,
						wrapWriter: func(w io.Writer) io.Writer { return budgetWriter{w, &left, spent} }}
					_, err := Run(ctx, job)
					switch {
					case err == nil:
						t.Fatal("Run succeeded")
					case cancelled && (!errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "interrupted; "+out+" is left as it was")):
						t.Errorf("error %q, want an interruption naming %s", err, out)
					case !cancelled && !errors.Is(err, syscall.ENOSPC):
						t.Errorf("error %q does not wrap ENOSPC", err)
					}
					t.Logf("error: %v", err)
					if !sameFiles(snapshot(t, out), before) {
						t.Errorf("%s changed (previous output: %v)", out, previous)
					}
					var want []string
					if previous {
						want = []string{"out"}
					}
					if got := desttest.DirNames(t, parent); !slices.Equal(got, want) {
						t.Errorf("%s holds %v, want %v", parent, got, want)
					}
				})
			}
		}
	}
}
