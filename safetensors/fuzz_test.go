package safetensors

import (
	"bytes"
	"encoding/binary"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// FuzzParseHeader feeds arbitrary bytes to the parser as a whole file. It
// must never panic; errors must match ErrMalformed and name the file. A
// file it accepts must be fully readable, its tensors must tile the data
// area, and writing its tensors back with the writer's header must give a
// file that parses to the same tensors.
func FuzzParseHeader(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		const name = "fuzz.safetensors"
		c, err := openBytes(name, data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), name) {
				t.Fatalf("error %q: not ErrMalformed naming the file", err)
			}
			return
		}
		if !slices.IsSorted(c.Names()) {
			t.Fatalf("Names() not sorted: %v", c.Names())
		}
		var total int64
		var specs []TensorSpec
		var sizes []int64
		for _, tn := range c.shards[0].tensors {
			info, ok := c.Info(tn.info.Name)
			if !ok {
				t.Fatalf("Info(%q) missing", tn.info.Name)
			}
			raw, err := c.Raw(info.Name)
			if err != nil || int64(len(raw)) != info.Bytes {
				t.Fatalf("Raw(%q): %d bytes, %v", info.Name, len(raw), err)
			}
			total += info.Bytes
			vals, err := c.Float32(info.Name)
			if decodable(info.DType) {
				if err != nil {
					t.Fatalf("Float32(%q): %v", info.Name, err)
				}
				size, _ := dtypeSize(info.DType)
				if int64(len(vals))*size != info.Bytes {
					t.Fatalf("Float32(%q): %d values for %d bytes", info.Name, len(vals), info.Bytes)
				}
			} else if !errors.Is(err, ErrUnsupportedDType) {
				t.Fatalf("Float32(%q) of %s: %v", info.Name, info.DType, err)
			}
			specs = append(specs, TensorSpec{Name: info.Name, DType: info.DType, Shape: info.Shape})
			sizes = append(sizes, info.Bytes)
		}
		if n := binary.LittleEndian.Uint64(data); total != int64(len(data))-8-int64(n) {
			t.Fatalf("tensors cover %d bytes of a %d-byte data area", total, int64(len(data))-8-int64(n))
		}

		hdr, err := buildHeader(specs, sizes, c.Metadata())
		if err != nil {
			t.Fatal(err)
		}
		again := append(hdr, data[len(data)-int(total):]...)
		c2, err := openBytes(name, again)
		if err != nil {
			t.Fatalf("rewritten file rejected: %v", err)
		}
		if !slices.Equal(c.Names(), c2.Names()) || len(c.Metadata()) != len(c2.Metadata()) {
			t.Fatalf("rewritten file differs: %v %v", c.Names(), c2.Names())
		}
		for _, n := range c.Names() {
			a, _ := c.Info(n)
			b, _ := c2.Info(n)
			ra, _ := c.Raw(n)
			rb, _ := c2.Raw(n)
			if a.DType != b.DType || !slices.Equal(a.Shape, b.Shape) || !bytes.Equal(ra, rb) {
				t.Fatalf("tensor %q differs after rewriting", n)
			}
		}
	})
}

// FuzzIndex feeds arbitrary bytes to the index parser and opens the result
// against a fixed directory of shards: a.safetensors holding x and y,
// b.safetensors holding z, the malformed bad.safetensors, and sub/c.safetensors
// holding w. It must never panic; errors must match ErrMalformed and name
// the index or a shard; an accepted index must map every tensor of exactly
// the shards it lists to a local path.
func FuzzIndex(f *testing.F) {
	dir := f.TempDir()
	writeShard := func(name string, tensors ...string) {
		var specs []TensorSpec
		for _, n := range tensors {
			specs = append(specs, Float32Tensor(n, F32, []int{1}, []float32{1}))
		}
		hdr, err := buildHeader(specs, slices.Repeat([]int64{4}, len(specs)), nil)
		if err != nil {
			f.Fatal(err)
		}
		writeTestFile(f, dir, name, append(hdr, make([]byte, 4*len(specs))...))
	}
	writeShard("a.safetensors", "x", "y")
	writeShard("b.safetensors", "z")
	writeShard("sub/c.safetensors", "w")
	writeTestFile(f, dir, "bad.safetensors", []byte("not a checkpoint"))
	index := filepath.Join(dir, "model.safetensors.index.json")

	f.Fuzz(func(t *testing.T, data []byte) {
		idx, err := parseIndex(index, data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), index) {
				t.Fatalf("error %q: not ErrMalformed naming the index", err)
			}
			return
		}
		if !slices.IsSorted(idx.shards) {
			t.Fatalf("shards not sorted: %v", idx.shards)
		}
		for tensor, shard := range idx.weightMap {
			if !filepath.IsLocal(shard) || !slices.Contains(idx.shards, shard) {
				t.Fatalf("tensor %q: shard %q not local or not listed", tensor, shard)
			}
		}

		c, err := opener{mmap: true}.openIndexData(index, data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), dir) {
				t.Fatalf("error %q: not ErrMalformed naming a file", err)
			}
			return
		}
		defer c.Close()
		if !slices.Equal(c.Names(), sortedKeys(idx.weightMap)) {
			t.Fatalf("Names() = %v, weight_map lists %v", c.Names(), sortedKeys(idx.weightMap))
		}
	})
}
