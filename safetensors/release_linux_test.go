package safetensors

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// rssFile returns the file-backed part of the process's resident set, in
// bytes, from /proc/self/status.
func rssFile(t *testing.T) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "RssFile:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}

// Reading tensors of a mapped file, decoded or as stored, must not leave their pages in the
// process's resident set: converting a checkpoint larger than memory reads
// every tensor once.
func TestFloat32ReleasesMappedPages(t *testing.T) {
	dir := t.TempDir()
	const n = 2 << 20 // 8 MiB per F32 tensor
	data := make([]float32, n)
	for i := range data {
		data[i] = float32(i % 1000)
	}
	var specs []TensorSpec
	for _, name := range []string{"a", "b", "c", "d"} {
		specs = append(specs, Float32Tensor(name, F32, []int{n}, data))
	}
	if err := WriteCheckpoint(context.Background(), dir, specs, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := Open(filepath.Join(dir, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.shards[0].mapped {
		t.Skip("the file could not be mapped")
	}
	before := rssFile(t)
	dst := make([]float32, n)
	for _, name := range c.Names() {
		if err := c.ReadFloat32(name, dst); err != nil {
			t.Fatal(err)
		}
		if dst[n-1] != data[n-1] {
			t.Fatalf("tensor %s decoded wrongly", name)
		}
	}
	for _, name := range c.Names() {
		var sum byte
		err := c.ReadStored(name, func(b []byte, _ int) error {
			for _, v := range b {
				sum += v
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	grown := rssFile(t) - before
	t.Logf("file-backed resident set grew by %d KiB after reading 32 MiB, decoded and as stored", grown>>10)
	if grown > 4<<20 {
		t.Errorf("file-backed resident set grew by %d MiB after reading four 8 MiB tensors", grown>>20)
	}
}
