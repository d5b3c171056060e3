package safetensors

import (
	"context"
	"errors"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
)

// writeShard writes a single-file checkpoint dir/NAME.safetensors holding
// small F32 tensors with the given names.
func writeShard(t *testing.T, dir, name string, tensors ...string) {
	t.Helper()
	var specs []TensorSpec
	for _, n := range tensors {
		specs = append(specs, Float32Tensor(n, F32, []int{2}, []float32{1, 2}))
	}
	if err := WriteCheckpoint(context.Background(), dir, specs, WriteOptions{Prefix: name}); err != nil {
		t.Fatal(err)
	}
}

func TestIndex(t *testing.T) {
	// Every case has shards a.safetensors with tensors x and y and
	// b.safetensors with z, and its own index.
	for _, tc := range []struct {
		name  string
		index string
		want  []string // phrases of the error; nil for success
	}{
		{"valid", `{"metadata": {"total_size": 24}, "weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}`, nil},
		{"valid with ./ prefix", `{"weight_map": {"x": "./a.safetensors", "y": "a.safetensors", "z": "sub/../b.safetensors"}}`, nil},
		{"not JSON", `{"weight_map": {`, []string{"not a JSON object", "unexpected end"}},
		{"not an object", `["a.safetensors"]`, []string{"not a JSON object", "array"}},
		{"missing weight_map", `{"metadata": {"total_size": 24}}`, []string{"no weight_map"}},
		{"weight_map not an object", `{"weight_map": ["a.safetensors"]}`, []string{"weight_map is not a JSON object"}},
		{"shard not a string", `{"weight_map": {"x": 1, "y": "a.safetensors", "z": "b.safetensors"}}`,
			[]string{`tensor "x"`, "not a string"}},
		{"missing shard", `{"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "c.safetensors"}}`,
			[]string{"c.safetensors", `tensor "z"`, "no such file"}},
		{"tensor in wrong shard", `{"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}`,
			[]string{`tensor "x"`, "for " + filepath.Join("DIR", "b.safetensors"), "stored in " + filepath.Join("DIR", "a.safetensors")}},
		{"tensor missing from its shard", `{"weight_map": {"w": "a.safetensors", "x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}`,
			[]string{`tensor "w"`, "a.safetensors", "missing"}},
		{"tensor not listed", `{"weight_map": {"x": "a.safetensors", "z": "b.safetensors"}}`,
			[]string{`tensor "y"`, "a.safetensors", "not listed"}},
		{"parent directory", `{"weight_map": {"x": "../a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}`,
			[]string{`tensor "x"`, `"../a.safetensors"`, "not a file inside"}},
		{"absolute path", `{"weight_map": {"x": "/etc/passwd", "y": "a.safetensors", "z": "b.safetensors"}}`,
			[]string{`tensor "x"`, `"/etc/passwd"`, "not a file inside"}},
		{"empty path", `{"weight_map": {"x": "", "y": "a.safetensors", "z": "b.safetensors"}}`,
			[]string{`tensor "x"`, "not a file inside"}},
		{"dot path", `{"weight_map": {"x": ".", "y": "a.safetensors", "z": "b.safetensors"}}`,
			[]string{`tensor "x"`, "not a file inside"}},
		{"directory as shard", `{"weight_map": {"x": "sub", "y": "a.safetensors", "z": "b.safetensors"}}`,
			[]string{filepath.Join("DIR", "sub"), "not a regular file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeShard(t, dir, "a", "x", "y")
			writeShard(t, dir, "b", "z")
			writeTestFile(t, dir, "sub/c.safetensors", nil)
			path := writeTestFile(t, dir, "model.safetensors.index.json", []byte(tc.index))
			c, err := Open(dir)
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if got := strings.Join(c.Names(), ","); got != "x,y,z" {
					t.Errorf("Names() = %s", got)
				}
				if info, _ := c.Info("z"); info.File != filepath.Join(dir, "b.safetensors") {
					t.Errorf("Info(z).File = %s", info.File)
				}
				return
			}
			wants := make([]string, len(tc.want))
			for i, w := range tc.want {
				wants[i] = strings.ReplaceAll(w, "DIR", dir)
			}
			msg := checkMalformed(t, c, err, wants...)
			if !strings.Contains(msg, path) && !strings.Contains(msg, dir) {
				t.Errorf("error %q names neither the index nor a shard", msg)
			}
		})
	}
}

// TestIndexDuplicateTensor checks a tensor stored in two shards; no index
// can list it twice, since JSON object keys are unique.
func TestIndexDuplicateTensor(t *testing.T) {
	dir := t.TempDir()
	writeShard(t, dir, "a", "x", "y")
	writeShard(t, dir, "b", "y", "z")
	writeTestFile(t, dir, "model.safetensors.index.json",
		[]byte(`{"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}`))
	_, err := Open(dir)
	if err == nil {
		t.Fatal("Open succeeded")
	}
	for _, w := range []string{`tensor "y"`, filepath.Join(dir, "a.safetensors"), filepath.Join(dir, "b.safetensors"), "both"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
}

// TestIndexMissingShardIsNotExist checks that a missing shard can be told
// apart with errors.Is.
func TestIndexMissingShardIsNotExist(t *testing.T) {
	dir := t.TempDir()
	writeTestFile(t, dir, "model.safetensors.index.json", []byte(`{"weight_map": {"x": "gone.safetensors"}}`))
	if _, err := Open(dir); !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, ErrMalformed) {
		t.Errorf("Open = %v, want ErrNotExist and ErrMalformed", err)
	}
}

// TestIndexBadShard checks that a malformed shard is reported by its own
// name and tensor.
func TestIndexBadShard(t *testing.T) {
	dir := t.TempDir()
	shard := writeTestFile(t, dir, "s.safetensors",
		rawFile(`{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}`, make([]byte, 8)))
	writeTestFile(t, dir, "model.safetensors.index.json", []byte(`{"weight_map": {"w": "s.safetensors"}}`))
	_, err := Open(dir)
	if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), shard) || !strings.Contains(err.Error(), `tensor "w"`) {
		t.Errorf("Open = %v", err)
	}
}
