package safetensors

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// rawFile assembles file bytes from a header and a data area without any
// validation, to build malformed files.
func rawFile(header string, data []byte) []byte {
	b := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	b = append(b, header...)
	return append(b, data...)
}

// writeTestFile writes b to dir/name and returns the path.
func writeTestFile(t testing.TB, dir, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// checkMalformed fails t unless Open failed with an ErrMalformed error
// that mentions every string in wants. It returns the message.
func checkMalformed(t *testing.T, c *Checkpoint, err error, wants ...string) string {
	t.Helper()
	if err == nil {
		c.Close()
		t.Fatal("Open succeeded")
	}
	if !errors.Is(err, ErrMalformed) {
		t.Errorf("error %q does not match ErrMalformed", err)
	}
	msg := err.Error()
	for _, w := range wants {
		if !strings.Contains(msg, w) {
			t.Errorf("error %q does not mention %q", msg, w)
		}
	}
	return msg
}

// bothPaths runs f once with memory mapping and once with the ReadAt path
// used on platforms without mmap.
func bothPaths(t *testing.T, f func(t *testing.T, open func(path string) (*Checkpoint, error))) {
	for _, mmap := range []bool{true, false} {
		name := "readat"
		if mmap {
			name = "mmap"
		}
		t.Run(name, func(t *testing.T) {
			f(t, opener{mmap: mmap}.open)
		})
	}
}

// openBytes parses b as the content of a file called name, as Open would,
// without touching the file system.
func openBytes(name string, b []byte) (*Checkpoint, error) {
	s := &shard{path: name, mem: b, size: int64(len(b))}
	if err := s.parse(); err != nil {
		return nil, err
	}
	return newCheckpoint(name, []*shard{s}), nil
}
