package model

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/transmla/transmla/safetensors"
)

// Linear is a dense projection y = W·x + b in nn.Linear layout: W is Out×In,
// row-major; B is nil or has Out entries.
type Linear struct {
	W []float32
	B []float32
}

// Layer holds one decoder block's weights.
type Layer struct {
	AttnNorm       []float32
	Q, K, V, O     Linear
	MLPNorm        []float32
	Gate, Up, Down Linear
}

// Model is a loaded checkpoint with float32 weights.
type Model struct {
	Config Config
	Embed  []float32 // VocabSize×HiddenSize
	Layers []Layer
	Norm   []float32
	// LMHead shares its W with Embed when the embeddings are tied.
	LMHead Linear
	// StorageDType is the dtype of the attention weights on disk; the KV cache
	// is reported in it.
	StorageDType safetensors.DType
}

// KVCacheBytesPerToken is the cache of standard GQA attention in the
// checkpoint's dtype.
func (m *Model) KVCacheBytesPerToken() int64 {
	return m.Config.KVCacheBytesPerToken(m.StorageDType)
}

// KVCacheBytesPerToken is the GQA cache per token over all layers when
// keys and values are stored as dt.
func (c Config) KVCacheBytesPerToken(dt safetensors.DType) int64 {
	return int64(c.KVCacheValuesPerToken()) * int64(dt.Size())
}

// AttentionDType is the stored dtype of the attention weights (layer 0's
// q_proj), the dtype in which the KV cache is reported.
func AttentionDType(ckpt *safetensors.Checkpoint) (safetensors.DType, bool) {
	info, ok := ckpt.Info("model.layers.0.self_attn.q_proj.weight")
	return info.DType, ok
}

// Load reads config.json and the safetensors weights of the checkpoint
// directory dir. progress, when not nil, is called after each tensor with
// the number done and the total.
func Load(ctx context.Context, dir string, progress func(done, total int)) (*Model, error) {
	cfg, err := LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	ckpt, err := safetensors.Open(dir)
	if err != nil {
		return nil, err
	}
	defer ckpt.Close()
	return fromCheckpoint(ctx, cfg, ckpt, progress)
}

// tensorReq is one tensor the model needs, with the shape config.json implies.
type tensorReq struct {
	name  string
	shape []int
	dst   *[]float32
}

func fromCheckpoint(ctx context.Context, cfg Config, ckpt *safetensors.Checkpoint, progress func(done, total int)) (*Model, error) {
	// Each layer has several tensors: a layer count beyond the tensor count
	// is a config error, found before anything is sized by it.
	if cfg.NumLayers > len(ckpt.Names()) {
		return nil, fmt.Errorf("config.json: num_hidden_layers %d exceeds the %d tensors of checkpoint %s", cfg.NumLayers, len(ckpt.Names()), strings.Join(ckpt.Files(), ", "))
	}
	D, I := cfg.HiddenSize, cfg.IntermediateSize
	qOut, kvOut := cfg.NumHeads*cfg.HeadDim, cfg.NumKVHeads*cfg.HeadDim
	m := &Model{Config: cfg, Layers: make([]Layer, cfg.NumLayers)}
	reqs := []tensorReq{
		{"model.embed_tokens.weight", []int{cfg.VocabSize, D}, &m.Embed},
		{"model.norm.weight", []int{D}, &m.Norm},
	}
	if !cfg.TieWordEmbeddings {
		reqs = append(reqs, tensorReq{"lm_head.weight", []int{cfg.VocabSize, D}, &m.LMHead.W})
	}
	linear := func(prefix string, l *Linear, out, in int, bias bool) {
		reqs = append(reqs, tensorReq{prefix + ".weight", []int{out, in}, &l.W})
		if bias {
			reqs = append(reqs, tensorReq{prefix + ".bias", []int{out}, &l.B})
		}
	}
	for i := range m.Layers {
		l := &m.Layers[i]
		p := fmt.Sprintf("model.layers.%d.", i)
		reqs = append(reqs,
			tensorReq{p + "input_layernorm.weight", []int{D}, &l.AttnNorm},
			tensorReq{p + "post_attention_layernorm.weight", []int{D}, &l.MLPNorm})
		linear(p+"self_attn.q_proj", &l.Q, qOut, D, cfg.QKVBias)
		linear(p+"self_attn.k_proj", &l.K, kvOut, D, cfg.QKVBias)
		linear(p+"self_attn.v_proj", &l.V, kvOut, D, cfg.QKVBias)
		linear(p+"self_attn.o_proj", &l.O, D, qOut, cfg.OBias)
		linear(p+"mlp.gate_proj", &l.Gate, I, D, cfg.MLPBias)
		linear(p+"mlp.up_proj", &l.Up, I, D, cfg.MLPBias)
		linear(p+"mlp.down_proj", &l.Down, D, I, cfg.MLPBias)
	}
	for i, r := range reqs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		data, err := readTensor(ckpt, r)
		if err != nil {
			return nil, err
		}
		*r.dst = data
		if progress != nil {
			progress(i+1, len(reqs))
		}
	}
	if cfg.TieWordEmbeddings {
		m.LMHead.W = m.Embed
	}
	m.StorageDType, _ = AttentionDType(ckpt) // present: checked above
	return m, nil
}

func readTensor(ckpt *safetensors.Checkpoint, r tensorReq) ([]float32, error) {
	info, ok := ckpt.Info(r.name)
	if !ok {
		return nil, fmt.Errorf("checkpoint %s: tensor %q is missing (config.json implies it exists)", strings.Join(ckpt.Files(), ", "), r.name)
	}
	if !slices.Equal(info.Shape, r.shape) {
		return nil, fmt.Errorf("checkpoint %s: tensor %q has shape %v, config.json implies %v", info.File, r.name, info.Shape, r.shape)
	}
	data, err := ckpt.Float32(r.name)
	if err != nil {
		return nil, err
	}
	for i, v := range data {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return nil, fmt.Errorf("checkpoint %s: tensor %q has a non-finite value (%v) at flat index %d", info.File, r.name, v, i)
		}
	}
	return data, nil
}
