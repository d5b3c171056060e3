package safetensors

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/internal/desttest"
)

// testTensor is a tensor of a round-trip test with its expected decoding.
type testTensor struct {
	name  string
	dt    DType
	shape []int
	data  []float32
}

// want returns the values Float32 must deliver for tt: its data rounded to
// the stored dtype.
func (tt testTensor) want() []float32 {
	w := make([]float32, len(tt.data))
	for i, v := range tt.data {
		switch tt.dt {
		case BF16:
			w[i] = BF16ToFloat32(Float32ToBF16(v))
		case F16:
			w[i] = F16ToFloat32(Float32ToF16(v))
		default:
			w[i] = v
		}
	}
	return w
}

// makeTensors returns tensors of every float dtype, including a scalar, an
// empty tensor and one larger than the ReadAt staging buffer.
func makeTensors() []testTensor {
	r := rand.New(rand.NewPCG(7, 8))
	mk := func(name string, dt DType, shape ...int) testTensor {
		n := 1
		for _, d := range shape {
			n *= d
		}
		data := make([]float32, n)
		for i := range data {
			data[i] = float32(r.NormFloat64())
		}
		return testTensor{name, dt, shape, data}
	}
	return []testTensor{
		mk("embed.weight", BF16, 64, 48),
		mk("layers.0.q.weight", F16, 33, 17),
		mk("layers.0.norm", F32, 48),
		mk("layers.0.scale", F64, 5, 3),
		mk("scalar", F32),
		mk("empty", BF16, 0, 4),
		mk("big", F32, 300, 1000), // 1.2 MB, more than one readChunk
		mk("layers.1.k.weight", BF16, 7, 3, 5),
	}
}

func specsOf(ts []testTensor) []TensorSpec {
	specs := make([]TensorSpec, len(ts))
	for i, tt := range ts {
		specs[i] = Float32Tensor(tt.name, tt.dt, tt.shape, tt.data)
	}
	return specs
}

// checkTensors checks that c holds exactly ts with their expected values.
func checkTensors(t *testing.T, c *Checkpoint, ts []testTensor) {
	t.Helper()
	var names []string
	for _, tt := range ts {
		names = append(names, tt.name)
	}
	slices.Sort(names)
	if got := c.Names(); !slices.Equal(got, names) {
		t.Fatalf("Names() = %v, want %v", got, names)
	}
	for _, tt := range ts {
		info, ok := c.Info(tt.name)
		size, _ := dtypeSize(tt.dt)
		if !ok || info.Name != tt.name || info.DType != tt.dt || !slices.Equal(info.Shape, tt.shape) ||
			info.Bytes != int64(len(tt.data))*size || !slices.Contains(c.Files(), info.File) {
			t.Errorf("Info(%q) = %+v, %v", tt.name, info, ok)
		}
		got, err := c.Float32(tt.name)
		if err != nil {
			t.Fatal(err)
		}
		if want := tt.want(); !slices.Equal(got, want) {
			t.Errorf("Float32(%q) differs from the written values", tt.name)
		}
		dst := make([]float32, len(tt.data))
		if err := c.ReadFloat32(tt.name, dst); err != nil || !slices.Equal(dst, got) {
			t.Errorf("ReadFloat32(%q) = %v, differs from Float32", tt.name, err)
		}
		raw, err := c.Raw(tt.name)
		if err != nil || int64(len(raw)) != info.Bytes {
			t.Errorf("Raw(%q): %d bytes, %v", tt.name, len(raw), err)
		}
		enc := make([]byte, info.Bytes)
		EncodeFloat32(enc, tt.data, tt.dt)
		if !bytes.Equal(raw, enc) {
			t.Errorf("Raw(%q) differs from the encoded data", tt.name)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	ts := makeTensors()
	meta := map[string]string{"format": "pt", "note": "<&> ünïcode"}
	for _, tc := range []struct {
		name     string
		maxShard int64
		files    []string
	}{
		{"single", 0, []string{"model.safetensors"}},
		{"cap above total", 1 << 30, []string{"model.safetensors"}},
		// 7582 bytes of small tensors, then the 1.2 MB one alone, then 210.
		{"sharded", 20000, []string{
			"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
			"model-00003-of-00003.safetensors", "model.safetensors.index.json"}},
		{"one tensor per shard", 1, []string{
			"model-00001-of-00008.safetensors", "model-00002-of-00008.safetensors",
			"model-00003-of-00008.safetensors", "model-00004-of-00008.safetensors",
			"model-00005-of-00008.safetensors", "model-00006-of-00008.safetensors",
			"model-00007-of-00008.safetensors", "model-00008-of-00008.safetensors",
			"model.safetensors.index.json"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			err := WriteCheckpoint(context.Background(), dir, specsOf(ts), WriteOptions{MaxShardBytes: tc.maxShard, Metadata: meta})
			if err != nil {
				t.Fatal(err)
			}
			if got := desttest.DirNames(t, dir); !slices.Equal(got, tc.files) {
				t.Fatalf("files %v, want %v", got, tc.files)
			}
			bothPaths(t, func(t *testing.T, open func(string) (*Checkpoint, error)) {
				c, err := open(dir)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				checkTensors(t, c, ts)
				if got := c.Metadata(); len(got) != 2 || got["format"] != "pt" || got["note"] != meta["note"] {
					t.Errorf("Metadata() = %v", got)
				}
				if n := len(tc.files); n > 1 && len(c.Files()) != n-1 {
					t.Errorf("Files() = %v", c.Files())
				}
			})
		})
	}
}

// TestOpenPaths checks the accepted forms of the path argument.
func TestOpenPaths(t *testing.T) {
	ts := makeTensors()[:3]
	dir := t.TempDir()
	single := filepath.Join(dir, "single")
	sharded := filepath.Join(dir, "sharded")
	both := filepath.Join(dir, "both")
	for _, d := range []string{single, sharded, both} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(WriteCheckpoint(ctx, single, specsOf(ts), WriteOptions{}))
	must(WriteCheckpoint(ctx, sharded, specsOf(ts), WriteOptions{MaxShardBytes: 1}))
	// A single file beside an index: the index must win.
	must(WriteCheckpoint(ctx, both, specsOf(ts), WriteOptions{MaxShardBytes: 1}))
	other := t.TempDir()
	must(WriteCheckpoint(ctx, other, specsOf(ts[:1]), WriteOptions{}))
	b, err := os.ReadFile(filepath.Join(other, "model.safetensors"))
	must(err)
	writeTestFile(t, both, "model.safetensors", b)

	for _, tc := range []struct {
		path  string
		files int
	}{
		{single, 1},
		{filepath.Join(single, "model.safetensors"), 1},
		{sharded, 3},
		{filepath.Join(sharded, "model.safetensors.index.json"), 3},
		{both, 3},
	} {
		c, err := Open(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Files()) != tc.files || len(c.Names()) != len(ts) {
			t.Errorf("Open(%s): files %v, names %v", tc.path, c.Files(), c.Names())
		}
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	}

	if _, err := Open(dir); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "model.safetensors") {
		t.Errorf("Open(empty dir) = %v, want ErrNotExist naming model.safetensors", err)
	}
	if _, err := Open(filepath.Join(dir, "nope.safetensors")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Open(missing) = %v, want ErrNotExist", err)
	}
}

// TestReadErrors checks the failures of the accessors of a valid checkpoint.
func TestReadErrors(t *testing.T) {
	bothPaths(t, func(t *testing.T, open func(string) (*Checkpoint, error)) {
		dir := t.TempDir()
		specs := []TensorSpec{
			Float32Tensor("w", BF16, []int{2, 2}, []float32{1, 2, 3, 4}),
			{Name: "ids", DType: U8, Shape: []int{3}, Write: func(w io.Writer) error {
				_, err := w.Write([]byte{7, 8, 9})
				return err
			}},
		}
		if err := WriteCheckpoint(context.Background(), dir, specs, WriteOptions{}); err != nil {
			t.Fatal(err)
		}
		c, err := open(filepath.Join(dir, "model.safetensors"))
		if err != nil {
			t.Fatal(err)
		}
		if raw, err := c.Raw("ids"); err != nil || !bytes.Equal(raw, []byte{7, 8, 9}) {
			t.Errorf("Raw(ids) = %v, %v", raw, err)
		}
		if _, err := c.Float32("ids"); !errors.Is(err, ErrUnsupportedDType) ||
			!strings.Contains(err.Error(), `"ids"`) || !strings.Contains(err.Error(), "U8") {
			t.Errorf("Float32(ids) = %v", err)
		}
		if err := c.ReadFloat32("ids", make([]float32, 3)); !errors.Is(err, ErrUnsupportedDType) {
			t.Errorf("ReadFloat32(ids) = %v", err)
		}
		if err := c.ReadFloat32("w", make([]float32, 3)); !errors.Is(err, ErrLength) || !strings.Contains(err.Error(), `"w"`) {
			t.Errorf("ReadFloat32 with short dst = %v", err)
		}
		if _, err := c.Float32("nope"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"nope"`) {
			t.Errorf("Float32(nope) = %v", err)
		}
		if _, ok := c.Info("nope"); ok {
			t.Error("Info(nope) found")
		}
		info, _ := c.Info("w")
		info.Shape[0] = 99 // must not alter the checkpoint
		if info, _ := c.Info("w"); info.Shape[0] != 2 {
			t.Error("Info shares its Shape slice")
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Errorf("second Close = %v", err)
		}
		if _, err := c.Raw("w"); !errors.Is(err, ErrClosed) {
			t.Errorf("Raw after Close = %v", err)
		}
		if _, err := c.Float32("w"); !errors.Is(err, ErrClosed) {
			t.Errorf("Float32 after Close = %v", err)
		}
	})
}

// TestOtherDTypes checks that headers with every dtype the library knows
// parse, and that I64 decodes to float32.
func TestOtherDTypes(t *testing.T) {
	var specs []TensorSpec
	for _, dt := range []DType{BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64} {
		size, _ := dtypeSize(dt)
		specs = append(specs, TensorSpec{Name: "t." + dt.String(), DType: dt, Shape: []int{2}, Write: func(w io.Writer) error {
			_, err := w.Write(make([]byte, 2*size))
			return err
		}})
	}
	i64 := binary.LittleEndian.AppendUint64(nil, uint64(math.MaxUint64)) // -1
	i64 = binary.LittleEndian.AppendUint64(i64, 1<<40)
	specs = append(specs, TensorSpec{Name: "ids", DType: I64, Shape: []int{2}, Write: func(w io.Writer) error {
		_, err := w.Write(i64)
		return err
	}})
	dir := t.TempDir()
	if err := WriteCheckpoint(context.Background(), dir, specs, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, s := range specs {
		info, ok := c.Info(s.Name)
		if !ok || info.DType != s.DType {
			t.Errorf("Info(%q) = %+v, %v", s.Name, info, ok)
		}
	}
	if got, err := c.Float32("ids"); err != nil || !slices.Equal(got, []float32{-1, 1 << 40}) {
		t.Errorf("Float32(ids) = %v, %v", got, err)
	}
}

// ReadStored hands out a tensor's stored bytes in order, in chunks of
// whole elements whose first indices add up, on both read paths.
func TestReadStored(t *testing.T) {
	bothPaths(t, func(t *testing.T, open func(string) (*Checkpoint, error)) {
		dir := t.TempDir()
		// Sizes around the chunk size; 3 bytes of F16 padding are avoided
		// by the even element counts of the odd-sized dtypes.
		tests := []struct {
			name  string
			dt    DType
			elems int
		}{
			{"empty", BF16, 0},
			{"small", F16, 7},
			{"one-chunk", F32, streamChunk / 4},
			{"chunk-and-a-bit", BF16, streamChunk/2 + 5},
			{"several", F64, 3*streamChunk/8 + 1},
		}
		var specs []TensorSpec
		for i, tc := range tests {
			data := make([]float32, tc.elems)
			for j := range data {
				data[j] = float32((j*7+i)%251) - 125
			}
			specs = append(specs, Float32Tensor(tc.name, tc.dt, []int{tc.elems}, data))
		}
		if err := WriteCheckpoint(context.Background(), dir, specs, WriteOptions{}); err != nil {
			t.Fatal(err)
		}
		c, err := open(filepath.Join(dir, "model.safetensors"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				raw, err := c.Raw(tc.name)
				if err != nil {
					t.Fatal(err)
				}
				want := bytes.Clone(raw)
				size := int(tc.dt.Size())
				var got []byte
				err = c.ReadStored(tc.name, func(b []byte, first int) error {
					if first*size != len(got) {
						t.Errorf("chunk at byte %d says it starts at element %d", len(got), first)
					}
					if len(b)%size != 0 || len(b) == 0 {
						t.Errorf("chunk of %d bytes for %d-byte elements", len(b), size)
					}
					got = append(got, b...)
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Errorf("streamed %d bytes differ from the %d stored", len(got), len(want))
				}
			})
		}
		stop := errors.New("stop")
		calls := 0
		err = c.ReadStored("several", func([]byte, int) error { calls++; return stop })
		if err != stop || calls != 1 {
			t.Errorf("callback error: got %v after %d calls, want it returned as is after 1", err, calls)
		}
		if err := c.ReadStored("absent", func([]byte, int) error { return nil }); !errors.Is(err, ErrNotFound) {
			t.Errorf("absent tensor: %v, want ErrNotFound", err)
		}
	})
}
