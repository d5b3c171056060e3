package safetensors

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/internal/sharedtest"
)

// sharedModel returns the path of a checkpoint in the project's shared
// reference data, skipping the test when that data is absent.
func sharedModel(t *testing.T, name string) string {
	t.Helper()
	return sharedtest.Path(t, filepath.Join("models", name, "model.safetensors"))
}

// sharedFact is an expected property of one tensor of a shared model. The
// values were obtained with python3 from the raw files: the header parsed
// with the json module; data read with struct.unpack ('<H' shifted left 16
// bits for BF16, '<I' for F32) and reinterpreted as float32 bits; sum adds
// every element, as a Python float (float64), in storage order.
type sharedFact struct {
	name  string
	dt    DType
	shape []int
	first []uint32 // float32 bits of the first elements
	last  uint32   // float32 bits of the last element
	sum   float64
	elems int
}

func checkShared(t *testing.T, c *Checkpoint, f sharedFact) {
	t.Helper()
	info, ok := c.Info(f.name)
	if !ok {
		t.Fatalf("tensor %q missing", f.name)
	}
	if info.DType != f.dt || !slices.Equal(info.Shape, f.shape) {
		t.Errorf("%s: %s %v, want %s %v", f.name, info.DType, info.Shape, f.dt, f.shape)
	}
	got, err := c.Float32(f.name)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != f.elems {
		t.Fatalf("%s: %d elements, want %d", f.name, len(got), f.elems)
	}
	for i, bits := range f.first {
		if math.Float32bits(got[i]) != bits {
			t.Errorf("%s[%d] = %#08x, want %#08x", f.name, i, math.Float32bits(got[i]), bits)
		}
	}
	if b := math.Float32bits(got[len(got)-1]); b != f.last {
		t.Errorf("%s last = %#08x, want %#08x", f.name, b, f.last)
	}
	var sum float64
	for _, v := range got {
		sum += float64(v)
	}
	if sum != f.sum {
		t.Errorf("%s: sum %v, want %v", f.name, sum, f.sum)
	}
}

func TestSharedLlamaGQA25M(t *testing.T) {
	path := sharedModel(t, "llama-gqa-25m")
	bothPaths(t, func(t *testing.T, open func(string) (*Checkpoint, error)) {
		c, err := open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// 56 tensors: embeddings, final norm and 9 per layer for 6 layers
		// (tied embeddings, so no lm_head).
		names := c.Names()
		if len(names) != 56 {
			t.Errorf("%d tensors, want 56", len(names))
		}
		if md := c.Metadata(); md["format"] != "pt" || len(md) != 1 {
			t.Errorf("Metadata() = %v", md)
		}
		layers := 0
		for _, n := range names {
			if strings.HasSuffix(n, ".self_attn.q_proj.weight") {
				layers++
			}
			if info, _ := c.Info(n); info.DType != BF16 {
				t.Errorf("%s: dtype %s, want BF16", n, info.DType)
			}
		}
		if layers != 6 {
			t.Errorf("%d layers, want 6", layers)
		}
		for name, shape := range map[string][]int{
			"model.embed_tokens.weight":                      {4096, 768},
			"model.norm.weight":                              {768},
			"model.layers.0.self_attn.q_proj.weight":         {768, 768},
			"model.layers.0.self_attn.k_proj.weight":         {256, 768},
			"model.layers.0.self_attn.v_proj.weight":         {256, 768},
			"model.layers.0.self_attn.o_proj.weight":         {768, 768},
			"model.layers.5.mlp.gate_proj.weight":            {896, 768},
			"model.layers.5.mlp.up_proj.weight":              {896, 768},
			"model.layers.5.mlp.down_proj.weight":            {768, 896},
			"model.layers.5.input_layernorm.weight":          {768},
			"model.layers.5.post_attention_layernorm.weight": {768},
		} {
			if info, ok := c.Info(name); !ok || !slices.Equal(info.Shape, shape) {
				t.Errorf("Info(%q) = %v, %v; want shape %v", name, info.Shape, ok, shape)
			}
		}
		for _, f := range []sharedFact{
			{name: "model.embed_tokens.weight", dt: BF16, shape: []int{4096, 768}, elems: 3145728,
				first: []uint32{0x3dc70000, 0xbcd50000, 0xbcb60000}, last: 0xbc3f0000, sum: 1050.0674936614741},
			{name: "model.layers.0.self_attn.q_proj.weight", dt: BF16, shape: []int{768, 768}, elems: 589824,
				first: []uint32{0xbca00000, 0x3c200000, 0x3bfd0000}, last: 0xbd440000, sum: 3.369251701020403},
			{name: "model.layers.5.self_attn.k_proj.weight", dt: BF16, shape: []int{256, 768}, elems: 196608,
				first: []uint32{0x3c940000, 0xbc0e0000, 0xbca40000}, last: 0x3d430000, sum: 3.438500551506877},
			{name: "model.norm.weight", dt: BF16, shape: []int{768}, elems: 768,
				first: []uint32{0x3fb30000, 0x3fbe0000, 0x3faa0000}, last: 0x3fb50000, sum: 1060.8359375},
		} {
			checkShared(t, c, f)
		}
	})
}

func TestSharedStories260K(t *testing.T) {
	path := sharedModel(t, "stories260K")
	bothPaths(t, func(t *testing.T, open func(string) (*Checkpoint, error)) {
		c, err := open(filepath.Dir(path)) // the directory form
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// 47 tensors: embeddings, final norm and 9 per layer for 5 layers.
		if n := len(c.Names()); n != 47 {
			t.Errorf("%d tensors, want 47", n)
		}
		for name, shape := range map[string][]int{
			"model.embed_tokens.weight":              {512, 64},
			"model.layers.0.self_attn.q_proj.weight": {64, 64},
			"model.layers.0.self_attn.k_proj.weight": {32, 64},
			"model.layers.4.mlp.gate_proj.weight":    {172, 64},
			"model.layers.4.mlp.down_proj.weight":    {64, 172},
		} {
			if info, ok := c.Info(name); !ok || !slices.Equal(info.Shape, shape) || info.DType != F32 {
				t.Errorf("Info(%q) = %+v, %v; want F32 %v", name, info, ok, shape)
			}
		}
		if _, ok := c.Info("model.layers.5.mlp.up_proj.weight"); ok {
			t.Error("found a sixth layer")
		}
		for _, f := range []sharedFact{
			{name: "model.embed_tokens.weight", dt: F32, shape: []int{512, 64}, elems: 32768,
				first: []uint32{0xbe96e950, 0x3f0fd864, 0x3e33a1f7}, last: 0xbed91acd, sum: -752.3677446640068},
			{name: "model.norm.weight", dt: F32, shape: []int{64}, elems: 64,
				first: []uint32{0x401d54ef, 0x3faf046e, 0x3fe00e5c}, last: 0x3fda986f, sum: 115.95276230573654},
			{name: "model.layers.4.mlp.down_proj.weight", dt: F32, shape: []int{64, 172}, elems: 11008,
				first: []uint32{0xbd44400e, 0xbcbc1e54, 0xbc9a3620}, last: 0xbb65d38b, sum: 19.543787761240765},
		} {
			checkShared(t, c, f)
		}
	})
}

// TestSharedRewrite rewrites the shared checkpoints from their raw tensors
// in data order. The models saved by current transformers (metadata first)
// must come out byte for byte identical, which checks header compatibility
// with the reference writer; stories260K, from an older writer that put
// __metadata__ last, must have an identical data area. A sharded rewrite
// must hold the same bytes.
func TestSharedRewrite(t *testing.T) {
	for _, tc := range []struct {
		model     string
		identical bool
	}{{"llama-gqa-25m", true}, {"qwen2-gqa-16m", true}, {"stories260K", false}} {
		model := tc.model
		t.Run(model, func(t *testing.T) {
			path := sharedModel(t, model)
			c, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var specs []TensorSpec
			for _, tn := range c.shards[0].tensors {
				raw, err := c.Raw(tn.info.Name)
				if err != nil {
					t.Fatal(err)
				}
				specs = append(specs, TensorSpec{Name: tn.info.Name, DType: tn.info.DType, Shape: tn.info.Shape,
					Write: func(w io.Writer) error {
						_, err := w.Write(raw)
						return err
					}})
			}
			dir := t.TempDir()
			if err := WriteCheckpoint(context.Background(), dir, specs, WriteOptions{Metadata: c.Metadata()}); err != nil {
				t.Fatal(err)
			}
			orig, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			again, err := os.ReadFile(filepath.Join(dir, "model.safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			dataStart := func(b []byte) int { return 8 + int(binary.LittleEndian.Uint64(b)) }
			switch {
			case tc.identical && !bytes.Equal(orig, again):
				t.Errorf("rewritten file differs from %s", path)
			case !bytes.Equal(orig[dataStart(orig):], again[dataStart(again):]):
				t.Errorf("rewritten data area differs from %s", path)
			}

			sharded := t.TempDir()
			if err := WriteCheckpoint(context.Background(), sharded, specs, WriteOptions{MaxShardBytes: int64(len(orig)) / 5}); err != nil {
				t.Fatal(err)
			}
			s, err := Open(sharded)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if len(s.Files()) < 5 || !slices.Equal(s.Names(), c.Names()) {
				t.Errorf("sharded: files %v, %d names", s.Files(), len(s.Names()))
			}
			for _, name := range c.Names() {
				a, _ := c.Raw(name)
				b, err := s.Raw(name)
				if err != nil || !bytes.Equal(a, b) {
					t.Errorf("sharded %s differs: %v", name, err)
				}
			}
		})
	}
}
