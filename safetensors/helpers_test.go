package safetensors

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
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

// dirEntries lists the names in dir, sorted.
func dirEntries(t testing.TB, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	slices.Sort(names)
	return names
}

// bothPaths runs f once with memory mapping and once with the ReadAt path
// used on platforms without mmap.
func bothPaths(t *testing.T, f func(t *testing.T)) {
	for _, mmap := range []bool{true, false} {
		name := "readat"
		if mmap {
			name = "mmap"
		}
		t.Run(name, func(t *testing.T) {
			defer func(old bool) { tryMmap = old }(tryMmap)
			tryMmap = mmap
			f(t)
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
