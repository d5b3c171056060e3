package model

import (
	"context"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/safetensors"
)

// paddedModel is a random model of cfg's unpadded shape, stored padded
// by pad dims.
func paddedModel(cfg Config, pad int, seed uint64) *Model {
	m := randomMLA(cfg, seed)
	m.Config = padded(cfg, pad)
	return m
}

// latentOut is kv_a_layernorm(c)·(row j of kv_b) summed, for one input x:
// what a layer's latent contributes to its keys and values, by the
// formula an engine applies to the stored (padded) tensors.
func latentOut(m *MLALayer, n, dr, D int, x []float32, eps float64, norm bool) []float64 {
	c := make([]float64, n)
	for i := range n {
		for j := range D {
			c[i] += float64(m.KVA.W[i*D+j]) * float64(x[j])
		}
		if m.KVA.B != nil {
			c[i] += float64(m.KVA.B[i])
		}
	}
	if norm {
		var ms float64
		for _, v := range c {
			ms += v * v / float64(n)
		}
		for i := range c {
			c[i] = c[i] / math.Sqrt(ms+eps) * float64(m.KVANorm[i])
		}
	}
	rows := len(m.KVB.W) / n
	out := make([]float64, rows)
	for r := range rows {
		for i := range n {
			out[r] += float64(m.KVB.W[r*n+i]) * c[i]
		}
	}
	return out
}

// A padded file holds the layer's weights and zeros at the stored widths,
// and reading it gives layers that compute what an engine computes on the
// stored tensors (the mean square over all N dims), with and without
// kv_a_layernorm and biases.
func TestLatentPaddingRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stock bool
		pad   int
	}{{"stock", true, 40}, {"exact with biases", false, 8}} {
		t.Run(tc.name, func(t *testing.T) {
			m := paddedModel(mlaConfig(tc.stock, rope.Scaling{}), tc.pad, 3)
			cfg := m.Config
			dir := writeModel(t, m, safetensors.F32)
			ckpt, err := safetensors.Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer ckpt.Close()
			n, dc, dr, D := 24+tc.pad, 24, 8, cfg.HiddenSize
			stored, err := ckpt.Float32("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
			if err != nil {
				t.Fatal(err)
			}
			want := m.Layers[1].MLA.KVA.W
			for i, v := range stored {
				var w float32
				switch {
				case i < dc*D:
					w = want[i]
				case i >= n*D:
					w = want[i-(n-dc)*D]
				}
				if v != w {
					t.Fatalf("stored kv_a value %d is %v, want %v (weights unchanged, zero padding)", i, v, w)
				}
			}
			storedLayer := &Layer{MLA: &MLALayer{KVA: Linear{W: stored}}}
			if storedLayer.MLA.KVB.W, err = ckpt.Float32("model.layers.1.self_attn.kv_b_proj.weight"); err != nil {
				t.Fatal(err)
			}
			if m.Config.MLA.KVABias {
				storedLayer.MLA.KVA.B, _ = ckpt.Float32("model.layers.1.self_attn.kv_a_proj_with_mqa.bias")
			}
			if tc.stock {
				storedLayer.MLA.KVANorm, _ = ckpt.Float32("model.layers.1.self_attn.kv_a_layernorm.weight")
			}

			got, err := Load(context.Background(), dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got.Config.MLA.KVLoraRank != dc || got.Config.MLA.LatentPad != tc.pad || got.Config.KVCacheValuesPerToken() != 2*(dc+dr) {
				t.Fatalf("loaded latent %d + padding %d, cache %d values", got.Config.MLA.KVLoraRank, got.Config.MLA.LatentPad, got.Config.KVCacheValuesPerToken())
			}
			x := randomMLA(mlaConfig(tc.stock, rope.Scaling{}), 9).Norm
			engine := latentOut(storedLayer.MLA, n, dr, D, x, cfg.RMSNormEps, tc.stock)
			ours := latentOut(got.Layers[1].MLA, dc, dr, D, x, cfg.RMSNormEps, tc.stock)
			for i := range engine {
				if math.Abs(ours[i]-engine[i]) > 1e-5*(1+math.Abs(engine[i])) {
					t.Fatalf("latent output %d: loaded layer gives %v, the stored tensors %v", i, ours[i], engine[i])
				}
			}
		})
	}
}

// Padding that is not zero (a fine-tuned padded model) is refused with the
// fix, not silently dropped.
func TestNonZeroPaddingRefused(t *testing.T) {
	dir := writeModel(t, paddedModel(mlaConfig(true, rope.Scaling{}), 8, 4), safetensors.F32)
	// Rewrite the weights as a genuine 32-dim latent under the padded config.
	wideCfg := mlaConfig(true, rope.Scaling{})
	wideCfg.MLA.KVLoraRank = 32
	wide := randomMLA(wideCfg, 5)
	specs, err := wide.Tensors(safetensors.F32)
	if err != nil {
		t.Fatal(err)
	}
	if err := safetensors.WriteCheckpoint(context.Background(), dir, specs, safetensors.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = Load(context.Background(), dir, nil)
	if err == nil || !strings.Contains(err.Error(), "not zero") || !strings.Contains(err.Error(), "remove transmla.latent_rank") {
		t.Fatalf("loading non-zero padding: %v", err)
	}
}

// A padded bf16 model loaded with its stored dtype unpads as the float32
// load does (the kernels' 16-bit path holds no rescaled latent).
func TestLatentPaddingKeepDType(t *testing.T) {
	m := paddedModel(mlaConfig(true, rope.Scaling{}), 40, 3)
	dir := writeModel(t, m, safetensors.BF16)
	wide, err := Load(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	kept, err := LoadWith(context.Background(), dir, LoadOptions{KeepDType: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := range wide.Layers {
		w, k := wide.Layers[i].MLA, kept.Layers[i].MLA
		for _, p := range []struct {
			name       string
			want, have Linear
		}{{"kv_a_proj_with_mqa", w.KVA, k.KVA}, {"kv_b_proj", w.KVB, k.KVB}, {"q_proj (kept 16-bit)", w.Q, k.Q}} {
			if !slices.Equal(p.have.Float32(), p.want.Float32()) {
				t.Errorf("layer %d %s: the KeepDType load differs from the float32 one", i, p.name)
			}
		}
		if k.Q.W16.Bits == nil {
			t.Errorf("layer %d: q_proj was widened; KeepDType keeps it 16-bit", i)
		}
	}
}

// Padding for export reads a 16-bit layer through a copy: the layer it
// was given keeps its stored weights.
func TestPadLatentLeavesTheLayer(t *testing.T) {
	cfg := mlaConfig(true, rope.Scaling{})
	dir := writeModel(t, randomMLA(cfg, 5), safetensors.BF16)
	m, err := LoadWith(context.Background(), dir, LoadOptions{KeepDType: true})
	if err != nil {
		t.Fatal(err)
	}
	l := &m.Layers[0]
	if l.MLA.KVA.W16.Bits == nil || l.MLA.KVB.W16.Bits == nil {
		t.Fatal("the kept layer's latent weights are not 16-bit: the test shows nothing")
	}
	before := *l.MLA
	out, err := padLatent(padded(m.Config, 40), l)
	if err != nil {
		t.Fatal(err)
	}
	if out == l || out.MLA == l.MLA {
		t.Fatal("padLatent returned the layer itself")
	}
	if l.MLA.KVA.W != nil || l.MLA.KVB.W != nil || !slices.Equal(l.MLA.KVA.W16.Bits, before.KVA.W16.Bits) || !slices.Equal(l.MLA.KVB.W16.Bits, before.KVB.W16.Bits) {
		t.Error("padLatent changed the layer it was given")
	}
}
