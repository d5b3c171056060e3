package eval

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/safetensors"
)

// mlaCase describes one small MLA model of the tests.
type mlaCase struct {
	name                           string
	interleave, kvaNorm, biases    bool
	customFreq, yarn, tied, noNope bool
}

var mlaCases = []mlaCase{
	{name: "exact rotate-half with biases", biases: true},
	{name: "stock interleaved with norm", interleave: true, kvaNorm: true, tied: true},
	{name: "interleaved, norm and biases", interleave: true, kvaNorm: true, biases: true},
	{name: "custom frequencies", customFreq: true, biases: true},
	{name: "yarn with mscale_all_dim", yarn: true, kvaNorm: true, interleave: true},
	{name: "no nope part", noNope: true, kvaNorm: true},
}

func (tc mlaCase) config() model.Config {
	nope := 8
	if tc.noNope {
		nope = 0
	}
	c := model.Config{
		Architecture: "DeepseekV3ForCausalLM", HiddenSize: 32, IntermediateSize: 40, NumLayers: 2,
		NumHeads: 4, NumKVHeads: 4, HeadDim: nope + 4, VocabSize: 50, MaxPositionEmbeddings: 64, RMSNormEps: 1e-5,
		Rope:      rope.Params{Dim: 4, Theta: 10000},
		HiddenAct: "silu", BOSTokenID: -1, TieWordEmbeddings: tc.tied, OBias: tc.biases,
		MLA: &model.MLAConfig{
			KVLoraRank: 12, QKRopeHeadDim: 4, QKNopeHeadDim: nope, VHeadDim: 6,
			KVANorm: tc.kvaNorm, QBias: tc.biases, KVABias: tc.biases, RopeInterleave: tc.interleave,
		},
	}
	if tc.customFreq {
		c.MLA.RopeInvFreq = []float64{0.9, 0.003}
	}
	if tc.yarn {
		c.Rope.Scaling = rope.Scaling{Type: "yarn", Factor: 4, OriginalMaxPositionEmbeddings: 16, MScale: 1, MScaleAllDim: 1}
	}
	return c
}

// maxRelErr is max |got − want| over max |want|.
func maxRelErr[F float32 | float64](got []float32, want []F) float64 {
	var maxErr, scale float64
	for i := range want {
		maxErr = math.Max(maxErr, math.Abs(float64(got[i])-float64(want[i])))
		scale = math.Max(scale, math.Abs(float64(want[i])))
	}
	return maxErr / scale
}

var testTokens = []int{5, 17, 49, 0, 3, 3, 22, 41, 8, 30, 12, 7}

// Both attention paths, absorbed and decompressed, against the float64
// reference (which decompresses, as transformers does).
func TestMLAForwardMatchesReference(t *testing.T) {
	for i, tc := range mlaCases {
		for _, path := range []MLAPath{PathAbsorbed, PathDecompressed} {
			t.Run(tc.name+"/"+path.String(), func(t *testing.T) {
				m := randomModel(t, tc.config(), uint64(i))
				r, err := NewRunnerWith(m, kernels.NewNative(), Options{MaxPositions: 32, MLAPath: path})
				if err != nil {
					t.Fatal(err)
				}
				got, err := r.Forward(context.Background(), r.NewCache(), testTokens, true)
				if err != nil {
					t.Fatal(err)
				}
				if e := maxRelErr(got, referenceMLA(m, testTokens)); e > 1e-5 {
					t.Errorf("logits differ from the float64 reference by %.3g (relative)", e)
				}
			})
		}
	}
}

// Decoding one token at a time after a prompt, by either path, gives the
// logits of one full forward pass.
func TestMLAIncrementalMatchesFullForward(t *testing.T) {
	for i, tc := range mlaCases {
		for _, path := range []MLAPath{PathAbsorbed, PathDecompressed} {
			t.Run(tc.name+"/"+path.String(), func(t *testing.T) {
				testMLAIncremental(t, tc, uint64(10+i), path)
			})
		}
	}
}

func testMLAIncremental(t *testing.T, tc mlaCase, seed uint64, path MLAPath) {
	m := randomModel(t, tc.config(), seed)
	r, err := NewRunnerWith(m, kernels.NewNative(), Options{MaxPositions: 16, MLAPath: path})
	if err != nil {
		t.Fatal(err)
	}
	full, err := r.Forward(context.Background(), r.NewCache(), testTokens, true)
	if err != nil {
		t.Fatal(err)
	}
	V := m.Config.VocabSize
	cache := r.NewCache()
	step, err := r.Forward(context.Background(), cache, testTokens[:5], false)
	for n := 5; ; n++ {
		if err != nil {
			t.Fatal(err)
		}
		if e := maxRelErr(step, full[(n-1)*V:n*V]); e > 1e-5 {
			t.Fatalf("position %d: incremental logits differ by %.3g (relative)", n-1, e)
		}
		if n == len(testTokens) {
			break
		}
		step, err = r.Forward(context.Background(), cache, testTokens[n:n+1], false)
	}
}

// A GQA model with one KV head is an MLA model with no nope part: the one
// rotated key is the shared RoPE key, the value is the latent and kv_b_proj
// copies it to every head. Both must give the same logits, in both RoPE
// layouts (interleaved: the rope rows of q_proj and kv_a permuted).
func TestMQAAsMLAGivesSameLogits(t *testing.T) {
	dir := t.TempDir()
	spec := model.DefaultSynthetic()
	spec.Layers, spec.KVHeads, spec.Hidden, spec.Intermediate, spec.QKVBias = 2, 1, 64, 96, true
	if err := model.WriteSynthetic(context.Background(), dir, spec); err != nil {
		t.Fatal(err)
	}
	src, err := model.Load(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	tokens := []int{1, 200, 7, 99, 256, 31, 64, 5}
	want := runAll(t, src, tokens)
	for _, interleave := range []bool{false, true} {
		d := src.Config.HeadDim
		cfg := src.Config
		cfg.Architecture, cfg.NumKVHeads, cfg.QKVBias = "DeepseekV3ForCausalLM", cfg.NumHeads, false
		cfg.MLA = &model.MLAConfig{KVLoraRank: d, QKRopeHeadDim: d, VHeadDim: d, QBias: true, KVABias: true, RopeInterleave: interleave}
		// perm maps stored rope row r to the rotate-half row it holds.
		perm := make([]int, d)
		for r := range d {
			perm[r] = r
		}
		if interleave {
			for j := range d / 2 {
				perm[2*j], perm[2*j+1] = j, d/2+j
			}
		}
		rows := func(l model.Linear, rowOf func(r int) int, out int) model.Linear {
			in := len(l.W) / (len(l.B))
			res := model.Linear{W: make([]float32, out*in), B: make([]float32, out)}
			for r := range out {
				s := rowOf(r)
				copy(res.W[r*in:(r+1)*in], l.W[s*in:(s+1)*in])
				res.B[r] = l.B[s]
			}
			return res
		}
		dst := &model.Model{Config: cfg, Embed: src.Embed, Norm: src.Norm, LMHead: src.LMHead, StorageDType: src.StorageDType}
		H := cfg.NumHeads
		for _, l := range src.Layers {
			kvb := make([]float32, H*d*d)
			for h := range H {
				for i := range d {
					kvb[(h*d+i)*d+i] = 1
				}
			}
			kva := model.Linear{W: append(append([]float32{}, l.V.W...), l.K.W...), B: append(append([]float32{}, l.V.B...), l.K.B...)}
			dst.Layers = append(dst.Layers, model.Layer{
				AttnNorm: l.AttnNorm, MLPNorm: l.MLPNorm, O: l.O, Gate: l.Gate, Up: l.Up, Down: l.Down,
				MLA: &model.MLALayer{
					Q: rows(l.Q, func(r int) int { return r/d*d + perm[r%d] }, H*d),
					KVA: rows(kva, func(r int) int {
						if r < d {
							return r
						}
						return d + perm[r-d]
					}, 2*d),
					KVB: model.Linear{W: kvb},
				},
			})
		}
		if got := runAll(t, dst, tokens); maxRelErr(got, want) > 1e-5 {
			t.Errorf("interleave %v: MLA rewrite of MQA differs by %.3g (relative)", interleave, maxRelErr(got, want))
		}
	}
}

func runAll(t *testing.T, m *model.Model, tokens []int) []float32 {
	t.Helper()
	r, err := NewRunner(m, kernels.Gonum{}, len(tokens))
	if err != nil {
		t.Fatal(err)
	}
	out, err := r.Forward(context.Background(), r.NewCache(), tokens, true)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Applying the layers one at a time with a LayerRunner, then the final
// norm and head, is Forward.
func TestLayerRunnerMatchesForward(t *testing.T) {
	dir := t.TempDir()
	spec := model.DefaultSynthetic()
	spec.Layers, spec.QKVBias, spec.Hidden, spec.Intermediate = 2, true, 64, 96
	if err := model.WriteSynthetic(context.Background(), dir, spec); err != nil {
		t.Fatal(err)
	}
	gqa, err := model.Load(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		m    *model.Model
	}{
		{"GQA", gqa},
		{"MLA", randomModel(t, mlaCases[2].config(), 7)},
		{"MLA custom frequencies", randomModel(t, mlaCases[3].config(), 8)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const seqs, T = 3, 6
			cfg := tc.m.Config
			D, V := cfg.HiddenSize, cfg.VocabSize
			tokens := make([]int, seqs*T)
			for i := range tokens {
				tokens[i] = (i*37 + 11) % V
			}
			r, err := NewRunner(tc.m, kernels.Gonum{}, T)
			if err != nil {
				t.Fatal(err)
			}
			hidden, err := r.Embed(tokens)
			if err != nil {
				t.Fatal(err)
			}
			lr, err := NewLayerRunner(cfg, kernels.Gonum{}, T)
			if err != nil {
				t.Fatal(err)
			}
			for li := range tc.m.Layers {
				calls := 0
				want := make([]float32, len(hidden))
				kernels.RMSNorm(want, hidden, tc.m.Layers[li].AttnNorm, float32(cfg.RMSNormEps))
				err := lr.Apply(context.Background(), &tc.m.Layers[li], hidden, seqs, func(normed []float32, rows int) {
					if rows != T || len(normed) != T*D {
						t.Errorf("observe got %d rows (%d values), want %d", rows, len(normed), T)
					} else if e := maxRelErr(normed, want[calls*T*D:(calls+1)*T*D]); e > 0 {
						t.Errorf("layer %d sequence %d: observed input differs by %.3g", li, calls, e)
					}
					calls++
				})
				if err != nil {
					t.Fatal(err)
				}
				if calls != seqs {
					t.Errorf("layer %d: observe called %d times, want %d", li, calls, seqs)
				}
			}
			logits := Logits(kernels.Gonum{}, cfg, tc.m.Norm, tc.m.LMHead, hidden, seqs*T)
			for s := range seqs {
				want, err := r.Forward(context.Background(), r.NewCache(), tokens[s*T:(s+1)*T], true)
				if err != nil {
					t.Fatal(err)
				}
				if e := maxRelErr(logits[s*T*V:(s+1)*T*V], want); e > 1e-6 {
					t.Errorf("sequence %d: layer-by-layer logits differ from Forward by %.3g", s, e)
				}
			}
		})
	}
}

func TestLayerRunnerErrors(t *testing.T) {
	cfg := mlaCases[0].config()
	m := randomModel(t, cfg, 1)
	lr, err := NewLayerRunner(cfg, kernels.Gonum{}, 4)
	if err != nil {
		t.Fatal(err)
	}
	gqaLayer := m.Layers[0]
	gqaLayer.MLA = nil
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		run  func() error
		want string
	}{
		{"zero length", func() error { _, err := NewLayerRunner(cfg, kernels.Gonum{}, 0); return err }, "sequence length 0"},
		{"hidden size", func() error {
			return lr.Apply(context.Background(), &m.Layers[0], make([]float32, 5), 1, nil)
		}, "5 hidden values for 1 sequences of 4×32"},
		{"GQA layer in an MLA config", func() error {
			return lr.Apply(context.Background(), &gqaLayer, make([]float32, 4*32), 1, nil)
		}, "config says MLA true"},
		{"cancelled", func() error { return lr.Apply(ctx, &m.Layers[0], make([]float32, 4*32), 1, nil) }, "context canceled"},
		{"bad config", func() error {
			bad := cfg
			bad.MLA = &model.MLAConfig{KVLoraRank: 4, QKRopeHeadDim: 3, VHeadDim: 2}
			_, err := NewLayerRunner(bad, kernels.Gonum{}, 4)
			return err
		}, "model config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
}

// A DeepSeek-V3 checkpoint written from an in-memory model loads back with
// model.Load and evaluates to the same logits.
func TestDeepSeekV3CheckpointRoundTrip(t *testing.T) {
	for i, tc := range mlaCases {
		if tc.customFreq {
			continue // config.json cannot carry custom frequencies
		}
		t.Run(tc.name, func(t *testing.T) {
			m := randomModel(t, tc.config(), uint64(20+i))
			dir := t.TempDir()
			specs, err := m.Tensors(safetensors.F32)
			if err != nil {
				t.Fatal(err)
			}
			if err := safetensors.WriteCheckpoint(context.Background(), dir, specs, safetensors.WriteOptions{}); err != nil {
				t.Fatal(err)
			}
			cfgJSON, err := model.DeepSeekV3Config(m.Config, map[string]any{"transmla": map[string]any{"format": "exact"}, "torch_dtype": "float32"})
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "config.json"), cfgJSON, 0o644); err != nil {
				t.Fatal(err)
			}
			loaded, err := model.Load(context.Background(), dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(loaded.Config, m.Config) {
				t.Fatalf("config %+v, want %+v", loaded.Config, m.Config)
			}
			got, want := runAll(t, loaded, testTokens), runAll(t, m, testTokens)
			if e := maxRelErr(got, want); e != 0 {
				t.Errorf("logits of the loaded checkpoint differ by %.3g", e)
			}
			if b := loaded.KVCacheBytesPerToken(); b != int64((12+4)*2*4) {
				t.Errorf("KV cache %d bytes per token, want %d", b, (12+4)*2*4)
			}
		})
	}
}
