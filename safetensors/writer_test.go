package safetensors

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	st "github.com/nlpodyssey/safetensors"
	"github.com/transmla/transmla/internal/desttest"
)

// TestHeaderLayout checks the bytes of a written file against the format:
// length field, header padded with spaces to 8 bytes, tensors in the
// order given, metadata first.
func TestHeaderLayout(t *testing.T) {
	dir := t.TempDir()
	specs := []TensorSpec{
		Float32Tensor("zeta", F32, []int{1}, []float32{1.5}),
		Float32Tensor("alpha", BF16, []int{3}, []float32{1, 2, 3}),
		Float32Tensor("<mid>", F16, nil, []float32{-2}),
	}
	if err := WriteCheckpoint(context.Background(), dir, specs, WriteOptions{Metadata: map[string]string{"format": "pt"}}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	n := binary.LittleEndian.Uint64(b)
	if n%8 != 0 {
		t.Errorf("header length %d not a multiple of 8", n)
	}
	hdr := string(b[8 : 8+n])
	want := `{"__metadata__":{"format":"pt"},` +
		`"zeta":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},` +
		`"alpha":{"dtype":"BF16","shape":[3],"data_offsets":[4,10]},` +
		`"\u003cmid\u003e":{"dtype":"F16","shape":[],"data_offsets":[10,12]}}`
	if strings.TrimRight(hdr, " ") != want || len(hdr)-len(want) >= 8 {
		t.Errorf("header\n%q\nwant\n%q plus fewer than 8 spaces", hdr, want)
	}
	// 1.5 = 0x3fc00000; bf16 1, 2, 3 = 0x3f80, 0x4000, 0x4040; f16 -2 = 0xc000.
	data := []byte{0x00, 0x00, 0xc0, 0x3f, 0x80, 0x3f, 0x00, 0x40, 0x40, 0x40, 0x00, 0xc0}
	if !bytes.Equal(b[8+n:], data) {
		t.Errorf("data % x, want % x", b[8+n:], data)
	}
	// The library this package builds on, with its own validation, must
	// accept the file too.
	if _, err := st.Deserialize(b); err != nil {
		t.Errorf("library rejects the file: %v", err)
	}
}

func TestNoMetadataKey(t *testing.T) {
	dir := t.TempDir()
	if err := WriteCheckpoint(context.Background(), dir, []TensorSpec{Float32Tensor("w", F32, []int{1}, []float32{1})}, WriteOptions{Metadata: map[string]string{}}); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "model.safetensors"))
	if bytes.Contains(b, []byte(metadataKey)) {
		t.Error("empty metadata written")
	}
}

// TestShardedLayout checks shard planning and the index file.
func TestShardedLayout(t *testing.T) {
	dir := t.TempDir()
	sizes := []int{10, 10, 10, 50, 5, 5} // F32 elements: 40, 40, 40, 200, 20, 20 bytes
	var specs []TensorSpec
	for i, n := range sizes {
		specs = append(specs, Float32Tensor(fmt.Sprintf("t%d", i), F32, []int{n}, make([]float32, n)))
	}
	err := WriteCheckpoint(context.Background(), dir, specs, WriteOptions{MaxShardBytes: 80, Prefix: "pytorch"})
	if err != nil {
		t.Fatal(err)
	}
	// t0+t1 fill 80; t2 alone, since t3 would exceed; t3 alone, over the
	// cap; t4+t5.
	want := []string{
		"pytorch-00001-of-00004.safetensors", "pytorch-00002-of-00004.safetensors",
		"pytorch-00003-of-00004.safetensors", "pytorch-00004-of-00004.safetensors",
		"pytorch.safetensors.index.json",
	}
	if got := desttest.DirNames(t, dir); !slices.Equal(got, want) {
		t.Fatalf("files %v, want %v", got, want)
	}
	b, err := os.ReadFile(filepath.Join(dir, "pytorch.safetensors.index.json"))
	if err != nil {
		t.Fatal(err)
	}
	var idx struct {
		Metadata  map[string]int64  `json:"metadata"`
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatal(err)
	}
	if idx.Metadata["total_size"] != 360 {
		t.Errorf("total_size %d, want 360", idx.Metadata["total_size"])
	}
	wantMap := map[string]string{"t0": want[0], "t1": want[0], "t2": want[1], "t3": want[2], "t4": want[3], "t5": want[3]}
	if fmt.Sprint(idx.WeightMap) != fmt.Sprint(wantMap) {
		t.Errorf("weight_map %v, want %v", idx.WeightMap, wantMap)
	}
	c, err := Open(filepath.Join(dir, "pytorch.safetensors.index.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if len(c.Names()) != len(sizes) {
		t.Errorf("Names() = %v", c.Names())
	}
}

// specWriting returns a U8 spec of n bytes whose Write writes the given
// bytes and returns err.
func specWriting(name string, n int, write []byte, err error) TensorSpec {
	return TensorSpec{Name: name, DType: U8, Shape: []int{n}, Write: func(w io.Writer) error {
		if _, werr := w.Write(write); werr != nil {
			return werr
		}
		return err
	}}
}

// TestWriteFailures checks that failures name the tensor and leave no file
// behind, neither final nor temporary.
func TestWriteFailures(t *testing.T) {
	good := specWriting("good", 4, []byte{1, 2, 3, 4}, nil)
	errBoom := errors.New("boom")
	for _, tc := range []struct {
		name   string
		specs  []TensorSpec
		opts   WriteOptions
		target error
		want   []string
	}{
		{"short write", []TensorSpec{good, specWriting("short", 4, []byte{1, 2, 3}, nil)}, WriteOptions{},
			ErrLength, []string{`tensor "short"`, "produced 3 bytes", "needs 4"}},
		{"long write", []TensorSpec{good, specWriting("long", 4, []byte{1, 2, 3, 4, 5}, nil)}, WriteOptions{},
			ErrLength, []string{`tensor "long"`, "more than the 4 bytes"}},
		{"long write error ignored", []TensorSpec{good, {Name: "sloppy", DType: U8, Shape: []int{2}, Write: func(w io.Writer) error {
			w.Write([]byte{1, 2, 3})
			return nil
		}}}, WriteOptions{}, ErrLength, []string{`tensor "sloppy"`, "more than the 2 bytes"}},
		{"Write error", []TensorSpec{good, specWriting("bad", 4, nil, errBoom)}, WriteOptions{},
			errBoom, []string{`tensor "bad"`, "boom"}},
		{"error in last shard", []TensorSpec{good, good2(), specWriting("bad", 4, nil, errBoom)}, WriteOptions{MaxShardBytes: 4},
			errBoom, []string{`tensor "bad"`, "model-00003-of-00003.safetensors"}},
		{"too few values", []TensorSpec{Float32Tensor("f", BF16, []int{2, 3}, make([]float32, 5))}, WriteOptions{},
			ErrLength, []string{`tensor "f"`, "5 values", "[2 3]"}},
		{"integer Float32Tensor", []TensorSpec{Float32Tensor("f", I64, []int{2}, make([]float32, 2))}, WriteOptions{},
			ErrUnsupportedDType, []string{`tensor "f"`, "I64"}},
		{"duplicate name", []TensorSpec{good, good}, WriteOptions{}, nil, []string{`tensor "good" given twice`}},
		{"reserved name", []TensorSpec{specWriting(metadataKey, 0, nil, nil)}, WriteOptions{}, nil, []string{"invalid tensor name", metadataKey}},
		{"empty name", []TensorSpec{specWriting("", 0, nil, nil)}, WriteOptions{}, nil, []string{"invalid tensor name"}},
		{"invalid UTF-8 name", []TensorSpec{specWriting("a\xff", 0, nil, nil)}, WriteOptions{}, nil, []string{"invalid tensor name"}},
		{"invalid dtype", []TensorSpec{{Name: "d", DType: DType(77), Write: good.Write}}, WriteOptions{}, nil, []string{`tensor "d"`, "DType(77)"}},
		{"negative dim", []TensorSpec{{Name: "d", DType: F32, Shape: []int{2, -1}, Write: good.Write}}, WriteOptions{}, nil, []string{`tensor "d"`, "[2 -1]"}},
		{"overflowing shape", []TensorSpec{{Name: "d", DType: F32, Shape: []int{math.MaxInt, math.MaxInt, math.MaxInt}, Write: good.Write}}, WriteOptions{}, nil, []string{`tensor "d"`, "invalid shape"}},
		{"nil Write", []TensorSpec{{Name: "d", DType: F32}}, WriteOptions{}, nil, []string{`tensor "d"`, "no Write"}},
		{"negative cap", []TensorSpec{good}, WriteOptions{MaxShardBytes: -1}, nil, []string{"MaxShardBytes"}},
		{"prefix with directory", []TensorSpec{good}, WriteOptions{Prefix: "../x"}, nil, []string{`prefix "../x"`}},
		{"invalid UTF-8 metadata", []TensorSpec{good}, WriteOptions{Metadata: map[string]string{"k": "\xff"}}, nil, []string{"metadata", `"k"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			err := WriteCheckpoint(context.Background(), dir, tc.specs, tc.opts)
			if err == nil {
				t.Fatal("WriteCheckpoint succeeded")
			}
			if tc.target != nil && !errors.Is(err, tc.target) {
				t.Errorf("error %q does not match %v", err, tc.target)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if left := desttest.DirNames(t, dir); len(left) != 0 {
				t.Errorf("files left behind: %v", left)
			}
		})
	}
}

func good2() TensorSpec { return specWriting("good2", 4, []byte{5, 6, 7, 8}, nil) }

// TestWriteCancel checks that cancelling the context stops the write
// before the next tensor and removes the partial files.
func TestWriteCancel(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	called := false
	specs := []TensorSpec{
		{Name: "a", DType: U8, Shape: []int{1}, Write: func(w io.Writer) error {
			cancel()
			_, err := w.Write([]byte{1})
			return err
		}},
		{Name: "b", DType: U8, Shape: []int{1}, Write: func(w io.Writer) error {
			called = true
			_, err := w.Write([]byte{2})
			return err
		}},
	}
	err := WriteCheckpoint(ctx, dir, specs, WriteOptions{MaxShardBytes: 1})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("WriteCheckpoint = %v, want context.Canceled", err)
	}
	if called {
		t.Error("Write of the tensor after cancellation was called")
	}
	if left := desttest.DirNames(t, dir); len(left) != 0 {
		t.Errorf("files left behind: %v", left)
	}
}

func TestWriteMissingDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "nope")
	if err := WriteCheckpoint(context.Background(), dir, nil, WriteOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("WriteCheckpoint = %v, want ErrNotExist", err)
	}
	file := writeTestFile(t, t.TempDir(), "f", nil)
	if err := WriteCheckpoint(context.Background(), file, nil, WriteOptions{}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("WriteCheckpoint into a file = %v", err)
	}
}

// TestWriteEmpty checks that a checkpoint without tensors is a valid file.
func TestWriteEmpty(t *testing.T) {
	dir := t.TempDir()
	if err := WriteCheckpoint(context.Background(), dir, nil, WriteOptions{MaxShardBytes: 10}); err != nil {
		t.Fatal(err)
	}
	c, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if len(c.Names()) != 0 || len(c.Files()) != 1 {
		t.Errorf("Names() = %v, Files() = %v", c.Names(), c.Files())
	}
}

// TestOverwrite checks that writing over an existing checkpoint replaces it.
func TestOverwrite(t *testing.T) {
	dir := t.TempDir()
	for _, v := range []float32{1, 2} {
		if err := WriteCheckpoint(context.Background(), dir, []TensorSpec{Float32Tensor("w", F32, nil, []float32{v})}, WriteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := c.Float32("w"); err != nil || got[0] != 2 {
		t.Errorf("Float32(w) = %v, %v", got, err)
	}
	if left := desttest.DirNames(t, dir); len(left) != 1 {
		t.Errorf("files %v", left)
	}
}

// TestStaleIndex checks that writing a single file removes the index of an
// earlier sharded write, which would otherwise shadow it.
func TestStaleIndex(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	two := []TensorSpec{Float32Tensor("a", F32, nil, []float32{1}), Float32Tensor("b", F32, nil, []float32{2})}
	if err := WriteCheckpoint(ctx, dir, two, WriteOptions{MaxShardBytes: 4}); err != nil {
		t.Fatal(err)
	}
	if err := WriteCheckpoint(ctx, dir, two[:1], WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	want := []string{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors"}
	if got := desttest.DirNames(t, dir); !slices.Equal(got, want) {
		t.Errorf("files %v, want %v", got, want)
	}
	c, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.Names(); !slices.Equal(got, []string{"a"}) {
		t.Errorf("Names() = %v, want [a]", got)
	}
}

func TestSpecBytes(t *testing.T) {
	for _, tc := range []struct {
		spec TensorSpec
		want int64
	}{
		{TensorSpec{DType: BF16, Shape: []int{3, 4}}, 24},
		{TensorSpec{DType: F64}, 8},
		{TensorSpec{DType: F32, Shape: []int{0, -1}}, -1},
		{TensorSpec{DType: F64, Shape: []int{math.MaxInt, math.MaxInt, math.MaxInt}}, -1},
		{TensorSpec{DType: DType(50)}, -1},
	} {
		if got := tc.spec.Bytes(); got != tc.want {
			t.Errorf("%+v.Bytes() = %d, want %d", tc.spec, got, tc.want)
		}
	}
}
