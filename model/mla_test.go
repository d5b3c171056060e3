package model

import (
	"context"
	"encoding/json"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/safetensors"
)

const dsBase = `"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 96,
 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100, "max_position_embeddings": 256,
 "kv_lora_rank": 24, "q_lora_rank": null, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 12, "head_dim": 8,
 "n_routed_experts": 1, "first_k_dense_replace": 2`

func TestParseDeepSeekV3(t *testing.T) {
	for _, tc := range []struct {
		name  string
		json  string
		check func(t *testing.T, c Config)
	}{
		{"sizes and defaults", `{` + dsBase + `}`, func(t *testing.T, c Config) {
			m := c.MLA
			if m == nil {
				t.Fatal("no MLA config")
			}
			want := MLAConfig{KVLoraRank: 24, QKRopeHeadDim: 8, QKNopeHeadDim: 16, VHeadDim: 12, KVANorm: true, RopeInterleave: true}
			if !reflect.DeepEqual(*m, want) {
				t.Errorf("MLA %+v, want %+v", *m, want)
			}
			if c.HeadDim != 24 || c.Rope.Dim != 8 || c.QKVBias || c.OBias {
				t.Errorf("head_dim %d, rope dim %d, biases %v %v", c.HeadDim, c.Rope.Dim, c.QKVBias, c.OBias)
			}
			if got := c.KVCacheValuesPerToken(); got != (24+8)*2 {
				t.Errorf("KV values per token %d, want 64", got)
			}
			if got, want := c.AttentionScale(), 1/4.898979485566356; got-want > 1e-15 || want-got > 1e-15 {
				t.Errorf("attention scale %v, want 1/sqrt(24)", got)
			}
		}},
		{"attention_bias gives kv_a and o biases, not q", `{` + dsBase + `, "attention_bias": true, "rope_interleave": false}`, func(t *testing.T, c Config) {
			if m := c.MLA; m.QBias || !m.KVABias || !c.OBias || m.RopeInterleave {
				t.Errorf("q bias %v, kv_a bias %v, o bias %v, interleave %v", m.QBias, m.KVABias, c.OBias, m.RopeInterleave)
			}
		}},
		{"transmla object overrides", `{` + dsBase + `, "attention_bias": true,
			"transmla": {"format": "exact", "kv_a_layernorm": false, "q_bias": true, "kv_a_bias": false, "o_bias": false, "source": "x", "ranks": [1, 2]}}`,
			func(t *testing.T, c Config) {
				if m := c.MLA; m.KVANorm || !m.QBias || m.KVABias || c.OBias {
					t.Errorf("MLA %+v, o bias %v", *m, c.OBias)
				}
			}},
		{"no experts", `{` + strings.Replace(dsBase, `"first_k_dense_replace": 2`, `"first_k_dense_replace": 0`, 1) + `, "n_routed_experts": null}`, func(t *testing.T, c Config) {
			if c.MLA == nil {
				t.Error("no MLA")
			}
		}},
		{"yarn with mscale_all_dim scales attention", `{` + dsBase + `, "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 4, "mscale": 1, "mscale_all_dim": 1, "original_max_position_embeddings": 64}}`,
			func(t *testing.T, c Config) {
				if c.Rope.Scaling.Type != "yarn" || c.Rope.Dim != 8 {
					t.Fatalf("rope %+v", c.Rope)
				}
				ms := 0.1*1.3862943611198906 + 1
				want := ms * ms / 4.898979485566356
				if got := c.AttentionScale(); got-want > 1e-12 || want-got > 1e-12 {
					t.Errorf("attention scale %v, want %v", got, want)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig("config.json", []byte(tc.json))
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}

func TestParseDeepSeekV3Errors(t *testing.T) {
	for _, tc := range []struct {
		name, json, want string
	}{
		{"q_lora_rank", `{` + strings.Replace(dsBase, `"q_lora_rank": null`, `"q_lora_rank": 32`, 1) + `}`, "q_lora_rank 32: only q_lora_rank null"},
		{"kv heads", `{` + strings.Replace(dsBase, `"num_key_value_heads": 4`, `"num_key_value_heads": 2`, 1) + `}`, "num_key_value_heads 2 must equal num_attention_heads 4"},
		{"MoE", `{` + strings.Replace(dsBase, `"first_k_dense_replace": 2`, `"first_k_dense_replace": 1`, 1) + `}`, "MoE layers are not supported"},
		{"MoE by default", `{` + strings.Replace(strings.Replace(dsBase, `"first_k_dense_replace": 2`, `"x": 0`, 1), `"n_routed_experts": 1`, `"num_hidden_layers": 4`, 1) + `}`, "MoE layers are not supported"},
		{"missing kv_lora_rank", `{` + strings.Replace(dsBase, `"kv_lora_rank": 24,`, ``, 1) + `}`, "kv_lora_rank is missing"},
		{"odd rope", `{` + strings.Replace(dsBase, `"qk_rope_head_dim": 8`, `"qk_rope_head_dim": 7`, 1) + `}`, "rotary dimension 7 must be even"},
		{"huge rope", `{` + strings.Replace(dsBase, `"qk_rope_head_dim": 8`, `"qk_rope_head_dim": 100000000000`, 1) + `}`, "exceeds 65536"},
		{"zero latent", `{` + strings.Replace(dsBase, `"kv_lora_rank": 24`, `"kv_lora_rank": 0`, 1) + `}`, "kv_lora_rank 0"},
		{"bad experts", `{` + strings.Replace(dsBase, `"n_routed_experts": 1`, `"n_routed_experts": "many"`, 1) + `}`, "n_routed_experts"},
		{"bad transmla flag", `{` + dsBase + `, "transmla": {"q_bias": "yes"}}`, `key "transmla.q_bias": want true or false`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig("config.json", []byte(tc.json))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

// mlaConfig is a small MLA config as the converter would build it.
func mlaConfig(stock bool, scaling rope.Scaling) Config {
	c := Config{
		Architecture: "DeepseekV3ForCausalLM", HiddenSize: 64, IntermediateSize: 96, NumLayers: 2,
		NumHeads: 4, NumKVHeads: 4, HeadDim: 24, VocabSize: 100, MaxPositionEmbeddings: 512, RMSNormEps: 1e-5,
		Rope:      rope.Params{Dim: 8, Theta: 500000, Scaling: scaling},
		HiddenAct: "silu", BOSTokenID: 1, EOSTokenIDs: []int{2, 3},
		MLA: &MLAConfig{KVLoraRank: 24, QKRopeHeadDim: 8, QKNopeHeadDim: 16, VHeadDim: 12, RopeInterleave: true},
	}
	if stock {
		c.MLA.KVANorm = true
		c.MLA.KVABias, c.OBias = true, true
		c.TieWordEmbeddings = true
	} else {
		c.MLA.QBias, c.MLA.KVABias = true, true
		c.MLA.RopeInterleave = false
	}
	return c
}

// padded is c with its latent stored padded by pad zero dims.
func padded(c Config, pad int) Config {
	m := *c.MLA
	m.LatentPad = pad
	c.MLA = &m
	return c
}

func TestDeepSeekV3ConfigRoundTrip(t *testing.T) {
	llama3 := rope.Scaling{Type: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 128}
	yarn := rope.Scaling{Type: "yarn", Factor: 4, OriginalMaxPositionEmbeddings: 128, MScale: 1, MScaleAllDim: 0.707, BetaFast: 32, BetaSlow: 1}
	for _, tc := range []struct {
		name    string
		cfg     Config
		extra   map[string]any
		dtype   string
		attnBia bool
	}{
		{"exact", mlaConfig(false, rope.Scaling{}), map[string]any{"transmla": map[string]any{"format": "exact", "source": "llama"}}, "bfloat16", false},
		{"stock", mlaConfig(true, rope.Scaling{}), map[string]any{"transmla": map[string]any{"format": "deepseek-v3-stock"}, "torch_dtype": "float16"}, "float16", true},
		{"exact llama3", mlaConfig(false, llama3), nil, "bfloat16", false},
		{"stock llama3", mlaConfig(true, llama3), map[string]any{"transformers_version": "4.55.0"}, "bfloat16", true},
		{"stock yarn", mlaConfig(true, yarn), nil, "bfloat16", true},
		{"stock padded", padded(mlaConfig(true, rope.Scaling{}), 8), nil, "bfloat16", true},
		{"exact padded", padded(mlaConfig(false, rope.Scaling{}), 40), nil, "bfloat16", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data, err := DeepSeekV3Config(tc.cfg, tc.extra)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasSuffix(string(data), "}\n") || !strings.Contains(string(data), "\n  \"architectures\"") {
				t.Errorf("not indented JSON with a final newline:\n%s", data)
			}
			got, err := ParseConfig("config.json", data)
			if err != nil {
				t.Fatalf("%v\n%s", err, data)
			}
			if !reflect.DeepEqual(got, tc.cfg) {
				t.Errorf("round trip:\n got %+v %+v\nwant %+v %+v\n%s", got, *got.MLA, tc.cfg, *tc.cfg.MLA, data)
			}
			var raw map[string]any
			if err := json.Unmarshal(data, &raw); err != nil {
				t.Fatal(err)
			}
			for k, want := range map[string]any{
				"model_type": "deepseek_v3", "head_dim": 8.0, "q_lora_rank": nil, "first_k_dense_replace": 2.0, "num_key_value_heads": 4.0,
				"moe_intermediate_size": 96.0, "torch_dtype": tc.dtype, "attention_bias": tc.attnBia, "hidden_act": "silu",
			} {
				if !reflect.DeepEqual(raw[k], want) {
					t.Errorf("%s = %v, want %v", k, raw[k], want)
				}
			}
			wantScaling := map[string]any{"rope_type": tc.cfg.Rope.Scaling.Type, "factor": tc.cfg.Rope.Scaling.Factor}
			if tc.cfg.Rope.Scaling.Type == "" {
				// Plain RoPE is declared as an identity YaRN (exportScaling).
				wantScaling = map[string]any{"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512.0}
			}
			sc, _ := raw["rope_scaling"].(map[string]any)
			for k, want := range wantScaling {
				if !reflect.DeepEqual(sc[k], want) {
					t.Errorf("rope_scaling.%s = %v, want %v", k, sc[k], want)
				}
			}
			for k, v := range tc.extra {
				if k == "transmla" {
					for mk, mv := range v.(map[string]any) {
						if raw["transmla"].(map[string]any)[mk] != mv {
							t.Errorf("transmla.%s lost", mk)
						}
					}
				} else if !reflect.DeepEqual(raw[k], v) {
					t.Errorf("extra %s = %v, want %v", k, raw[k], v)
				}
			}
		})
	}
}

func TestDeepSeekV3ConfigErrors(t *testing.T) {
	gqa := mlaConfig(false, rope.Scaling{})
	gqa.MLA = nil
	custom := mlaConfig(false, rope.Scaling{})
	custom.MLA.RopeInvFreq = []float64{1, 2, 3, 4}
	windowed := mlaConfig(false, rope.Scaling{})
	windowed.SlidingWindow = 64
	mlpBias := mlaConfig(false, rope.Scaling{})
	mlpBias.MLPBias = true
	// Both flags contradict; the error names the first of kv_a_layernorm,
	// q_bias, kv_a_bias and o_bias, the same on every call.
	twoWrong := map[string]any{"transmla": map[string]any{"o_bias": false, "kv_a_layernorm": false}}
	for _, tc := range []struct {
		name  string
		cfg   Config
		extra map[string]any
		want  string
	}{
		{"GQA config", gqa, nil, "no MLA part"},
		{"custom frequencies", custom, nil, "custom RoPE frequencies"},
		{"extra overrides a derived key", mlaConfig(true, rope.Scaling{}), map[string]any{"hidden_size": 3}, `extra key "hidden_size"`},
		{"contradicting transmla flag", mlaConfig(true, rope.Scaling{}), map[string]any{"transmla": map[string]any{"kv_a_layernorm": false}}, "transmla.kv_a_layernorm"},
		{"transmla not an object", mlaConfig(true, rope.Scaling{}), map[string]any{"transmla": 3}, "must be an object"},
		{"sliding window", windowed, nil, "sliding window (sliding_window 64)"},
		{"MLP biases", mlpBias, nil, "mlp_bias"},
		{"two contradicting transmla flags", mlaConfig(true, rope.Scaling{}), twoWrong, "transmla.kv_a_layernorm"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Map order must not choose the error: ask several times.
			for range 20 {
				_, err := DeepSeekV3Config(tc.cfg, tc.extra)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("error %v, want %q", err, tc.want)
				}
			}
		})
	}
}

// randomMLA builds an in-memory MLA model of cfg with random weights.
func randomMLA(cfg Config, seed uint64) *Model {
	rng := rand.New(rand.NewPCG(seed, 1))
	vec := func(n int) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(rng.NormFloat64() * 0.2)
		}
		return v
	}
	m := &Model{Config: cfg, Embed: vec(cfg.VocabSize * cfg.HiddenSize), Norm: vec(cfg.HiddenSize), Layers: make([]Layer, cfg.NumLayers)}
	for i := range m.Layers {
		l := &m.Layers[i]
		for _, r := range layerReqs(cfg, i, l) {
			n := 1
			for _, d := range r.shape {
				n *= d
			}
			*r.dst = vec(n)
		}
	}
	if cfg.TieWordEmbeddings {
		m.LMHead.W = m.Embed
	} else {
		m.LMHead.W = vec(cfg.VocabSize * cfg.HiddenSize)
	}
	return m
}

// writeModel writes m as a checkpoint with its DeepSeek-V3 config.json.
func writeModel(t *testing.T, m *Model, dt safetensors.DType) string {
	t.Helper()
	dir := t.TempDir()
	specs, err := m.Tensors(dt)
	if err != nil {
		t.Fatal(err)
	}
	if err := safetensors.WriteCheckpoint(context.Background(), dir, specs, safetensors.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	cfg, err := DeepSeekV3Config(m.Config, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestLoadDeepSeekV3(t *testing.T) {
	for _, stock := range []bool{false, true} {
		t.Run(map[bool]string{false: "exact", true: "stock"}[stock], func(t *testing.T) {
			want := randomMLA(mlaConfig(stock, rope.Scaling{}), 3)
			dir := writeModel(t, want, safetensors.F32)
			got, err := Load(context.Background(), dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got.Config, want.Config) || got.StorageDType != safetensors.F32 {
				t.Fatalf("config %+v dtype %v", got.Config, got.StorageDType)
			}
			if !reflect.DeepEqual(got.Layers, want.Layers) || !slices.Equal(got.Embed, want.Embed) || !slices.Equal(got.LMHead.W, want.LMHead.W) {
				t.Error("loaded weights differ from the written ones")
			}
			if l := got.Layers[1].MLA; (l.KVANorm != nil) != stock || (l.Q.B != nil) == stock || l.KVA.B == nil {
				t.Errorf("optional tensors: kv_a_layernorm %v, q bias %v, kv_a bias %v", l.KVANorm != nil, l.Q.B != nil, l.KVA.B != nil)
			}

			r, err := OpenReader(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			l1, err := r.Layer(context.Background(), 1)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(*l1, want.Layers[1]) {
				t.Error("Reader.Layer(1) differs from the written layer")
			}
			head, err := r.LMHead()
			if err != nil {
				t.Fatal(err)
			}
			norm, err := r.Norm()
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(head.W, want.LMHead.W) || !slices.Equal(norm, want.Norm) || r.StorageDType() != safetensors.F32 || r.Checkpoint() == nil {
				t.Error("Reader's head, norm or dtype differ")
			}
			if _, err := r.Layer(context.Background(), 2); err == nil || !strings.Contains(err.Error(), "layer 2 out of range") {
				t.Errorf("layer 2: %v", err)
			}
		})
	}
}

func TestLoadDeepSeekV3Errors(t *testing.T) {
	dir := writeModel(t, randomMLA(mlaConfig(true, rope.Scaling{}), 4), safetensors.BF16)
	const kvb = "model.layers.1.self_attn.kv_b_proj.weight"
	for _, tc := range []struct {
		name string
		edit func(name string, d []float32) bool
		want []string
	}{
		{"missing kv_a_layernorm", func(name string, _ []float32) bool {
			return name != "model.layers.0.self_attn.kv_a_layernorm.weight"
		}, []string{"model.layers.0.self_attn.kv_a_layernorm.weight", "is missing"}},
		{"NaN in kv_b_proj", func(name string, d []float32) bool {
			if name == kvb {
				d[5] = float32(math.NaN())
			}
			return true
		}, []string{kvb, "non-finite", "index 5"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(context.Background(), rewrite(t, dir, safetensors.WriteOptions{}, tc.edit), nil)
			if err == nil {
				t.Fatal("Load succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestOpenReaderErrors(t *testing.T) {
	dir := writeSmall(t, smallSpec())
	noQ := rewrite(t, dir, safetensors.WriteOptions{}, func(name string, _ []float32) bool {
		return name != "model.layers.0.self_attn.q_proj.weight"
	})
	if _, err := OpenReader(noQ); err == nil || !strings.Contains(err.Error(), `"model.layers.0.self_attn.q_proj.weight" is missing`) {
		t.Errorf("OpenReader without q_proj: %v", err)
	}
}
