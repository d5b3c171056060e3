package model

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/transmla/transmla/safetensors"
)

// Linear is a dense projection y = W·x + b in nn.Linear layout: W is Out×In,
// row-major; B is nil or has Out entries. The weights are float32 in W, or,
// in a model loaded with LoadOptions.KeepDType, the checkpoint's 16-bit
// values in W16 (W nil): Float32 gives them as float32 either way.
type Linear struct {
	W   []float32
	W16 Bits16
	B   []float32
}

// Float32 returns the weights as float32: W itself, or W16 widened into a
// new slice.
func (l Linear) Float32() []float32 {
	if l.W != nil {
		return l.W
	}
	return l.W16.Float32()
}

// Bits16 is a tensor held as the 16-bit values it is stored with, BF16 or
// F16, so that a model's weights take the memory they take on disk; the
// kernels widen them to float32 exactly as they read them.
type Bits16 struct {
	DType safetensors.DType
	Bits  []uint16
}

// Float32 returns the values widened to float32 (exact), nil for none.
func (b Bits16) Float32() []float32 {
	if b.Bits == nil {
		return nil
	}
	out := make([]float32, len(b.Bits))
	conv := safetensors.BF16ToFloat32
	if b.DType == safetensors.F16 {
		conv = safetensors.F16ToFloat32
	}
	for i, h := range b.Bits {
		out[i] = conv(h)
	}
	return out
}

// Layer holds one decoder block's weights. GQA layers use Q, K, V and O;
// MLA layers use MLA and O.
type Layer struct {
	AttnNorm       []float32
	Q, K, V, O     Linear
	MLA            *MLALayer
	MLPNorm        []float32
	Gate, Up, Down Linear
}

// Model is a loaded checkpoint. Its weights are float32, except in a
// model loaded with LoadOptions.KeepDType, whose bf16 and f16 matrices
// (projections, embeddings and LM head) keep their stored 16-bit values
// (Linear.W16, Embed16); norms and biases are always float32.
type Model struct {
	Config Config
	Embed  []float32 // VocabSize×HiddenSize; nil when Embed16 holds it
	// Embed16 is the token embedding as stored, in a KeepDType model.
	Embed16 Bits16
	Layers  []Layer
	Norm    []float32
	// LMHead shares its weights with the embedding when they are tied.
	LMHead Linear
	// StorageDType is the dtype of the attention weights on disk; the KV cache
	// is reported in it.
	StorageDType safetensors.DType
}

// KVCacheBytesPerToken is the KV cache per token (GQA keys and values, or
// MLA latent and RoPE key) in the checkpoint's dtype.
func (m *Model) KVCacheBytesPerToken() int64 {
	return m.Config.KVCacheBytesPerToken(m.StorageDType)
}

// KVCacheBytesPerToken is the KV cache per token over all layers
// (KVCacheValuesPerToken) when its values are stored as dt.
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
// directory dir as float32. progress, when not nil, is called after each
// tensor with the number done and the total.
func Load(ctx context.Context, dir string, progress func(done, total int)) (*Model, error) {
	return LoadWith(ctx, dir, LoadOptions{Progress: progress})
}

// LoadOptions configures LoadWith.
type LoadOptions struct {
	// KeepDType keeps bf16 and f16 matrices as their stored 16-bit values
	// (Linear.W16, Model.Embed16) instead of widening them to float32:
	// half the memory, and what the kernels read fastest. Other dtypes are
	// read as float32.
	KeepDType bool
	// Progress, when not nil, is called after each tensor with the number
	// done and the total.
	Progress func(done, total int)
}

// LoadWith reads config.json and the safetensors weights of the
// checkpoint directory dir as opts says.
func LoadWith(ctx context.Context, dir string, opts LoadOptions) (*Model, error) {
	r, err := OpenReader(dir)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return r.load(ctx, opts)
}

// Reader gives access to a checkpoint one part at a time, so that a
// converter can stream layers without holding the whole model: open it,
// read the layers in turn, and Close it.
type Reader struct {
	cfg   Config
	ckpt  *safetensors.Checkpoint
	dtype safetensors.DType
}

// OpenReader reads dir's config.json and opens its safetensors files,
// checking what needs no tensor data: that every tensor config.json implies
// exists with its shape and a float dtype, and, for GQA, that no layer
// beyond num_hidden_layers is stored. Non-finite values are found as
// tensors are read.
func OpenReader(dir string) (*Reader, error) {
	cfg, err := LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	ckpt, err := safetensors.Open(dir)
	if err != nil {
		return nil, err
	}
	// Each layer has several tensors: a layer count beyond the tensor count
	// is a config error, found before anything is sized by it.
	if cfg.NumLayers > len(ckpt.Names()) {
		ckpt.Close()
		return nil, fmt.Errorf("config.json: num_hidden_layers %d exceeds the %d tensors of checkpoint %s", cfg.NumLayers, len(ckpt.Names()), strings.Join(ckpt.Files(), ", "))
	}
	if cfg.MLA == nil {
		// Weights of layers config.json does not count would be dropped
		// silently. (DeepSeek-V3 stores its multi-token-prediction module
		// as an extra layer, so MLA checkpoints are exempt.)
		if name, ok := beyondLayers(ckpt.Names(), cfg.NumLayers); ok {
			ckpt.Close()
			return nil, fmt.Errorf("checkpoint %s: tensor %q belongs to a layer beyond config.json's num_hidden_layers %d", strings.Join(ckpt.Files(), ", "), name, cfg.NumLayers)
		}
	}
	r := &Reader{cfg: cfg, ckpt: ckpt}
	// Checking every header now makes a missing or misshapen tensor of the
	// last layer fail at once, not after the layers before it were read.
	for _, req := range r.allReqs(&Model{Layers: make([]Layer, cfg.NumLayers)}) {
		if _, err := checkTensor(ckpt, req); err != nil {
			ckpt.Close()
			return nil, err
		}
	}
	r.dtype, _ = AttentionDType(ckpt) // layer 0's q_proj was just checked
	return r, nil
}

// beyondLayers returns the first of names that is a tensor of decoder
// layer n or a later one.
func beyondLayers(names []string, n int) (string, bool) {
	const prefix = "model.layers."
	for _, name := range names {
		rest, ok := strings.CutPrefix(name, prefix)
		if !ok {
			continue
		}
		idx, _, _ := strings.Cut(rest, ".")
		if i, err := strconv.Atoi(idx); err == nil && i >= n {
			return name, true
		}
	}
	return "", false
}

// Config is the checkpoint's parsed config.json.
func (r *Reader) Config() Config { return r.cfg }

// StorageDType is the stored dtype of the attention weights (layer 0's q_proj).
func (r *Reader) StorageDType() safetensors.DType { return r.dtype }

// Checkpoint is the open safetensors checkpoint, for tensors the Reader
// does not interpret. It is closed by Close.
func (r *Reader) Checkpoint() *safetensors.Checkpoint { return r.ckpt }

// Close releases the checkpoint's files.
func (r *Reader) Close() error { return r.ckpt.Close() }

// Embed reads the token embedding (VocabSize×HiddenSize).
func (r *Reader) Embed() ([]float32, error) {
	var e []float32
	return e, r.read(context.Background(), []tensorReq{embedReq(r.cfg, &e, nil)}, LoadOptions{})
}

// Norm reads the final RMSNorm weight.
func (r *Reader) Norm() ([]float32, error) {
	var n []float32
	return n, r.read(context.Background(), []tensorReq{normReq(r.cfg, &n)}, LoadOptions{})
}

// LMHead reads the output projection; with tied embeddings it is the
// token embedding.
func (r *Reader) LMHead() (Linear, error) {
	var l Linear
	req := embedReq(r.cfg, &l.W, nil)
	if !r.cfg.TieWordEmbeddings {
		req = headReq(r.cfg, &l.W, nil)
	}
	return l, r.read(context.Background(), []tensorReq{req}, LoadOptions{})
}

// Layer reads and checks decoder layer i's tensors only.
func (r *Reader) Layer(ctx context.Context, i int) (*Layer, error) {
	if i < 0 || i >= r.cfg.NumLayers {
		return nil, fmt.Errorf("checkpoint %s: layer %d out of range [0, %d)", strings.Join(r.ckpt.Files(), ", "), i, r.cfg.NumLayers)
	}
	l := &Layer{}
	if err := r.read(ctx, layerReqs(r.cfg, i, l), LoadOptions{}); err != nil {
		return nil, err
	}
	return l, unpadLatent(r.cfg, i, l)
}

// AttentionLayer reads decoder layer i's input norm and attention
// tensors only, leaving MLPNorm and the MLP nil: what a data-free
// conversion reads of a layer whose MLP it passes on unchanged.
func (r *Reader) AttentionLayer(ctx context.Context, i int) (*Layer, error) {
	if i < 0 || i >= r.cfg.NumLayers {
		return nil, fmt.Errorf("checkpoint %s: layer %d out of range [0, %d)", strings.Join(r.ckpt.Files(), ", "), i, r.cfg.NumLayers)
	}
	l := &Layer{}
	mlp := []*[]float32{&l.MLPNorm, &l.Gate.W, &l.Gate.B, &l.Up.W, &l.Up.B, &l.Down.W, &l.Down.B}
	var reqs []tensorReq
	for _, req := range layerReqs(r.cfg, i, l) {
		if !slices.Contains(mlp, req.dst) {
			reqs = append(reqs, req)
		}
	}
	if err := r.read(ctx, reqs, LoadOptions{}); err != nil {
		return nil, err
	}
	return l, unpadLatent(r.cfg, i, l)
}

// WriteTensor writes the named tensor, one of the model's, to w stored
// as dt (BF16, F16, F32 or F64), after the checks that reading it makes: a
// float dtype and finite values, also once rounded to dt. A tensor stored
// as dt already is copied byte for byte, its stored bits tested for
// finiteness chunk by chunk (decoding and rounding back would give the
// same bytes); others are decoded and rounded to nearest even chunk by
// chunk. Either way the tensor is never held in memory whole: this is how
// a converter passes on the weights it does not change.
func (r *Reader) WriteTensor(ctx context.Context, name string, dt safetensors.DType, w io.Writer) error {
	info, ok := r.ckpt.Info(name)
	if !ok {
		return fmt.Errorf("checkpoint %s: no tensor %q", strings.Join(r.ckpt.Files(), ", "), name)
	}
	if err := checkDType(info); err != nil {
		return err
	}
	switch dt {
	case safetensors.BF16, safetensors.F16, safetensors.F32, safetensors.F64:
	default:
		return fmt.Errorf("write tensor %q as %s: not a float dtype", name, dt)
	}
	size := int(info.DType.Size())
	var values []float32
	var encoded []byte
	return r.ckpt.ReadStored(name, func(chunk []byte, first int) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if info.DType == dt {
			if k := safetensors.FirstNonFinite(chunk, dt); k >= 0 {
				v := make([]float32, 1)
				if err := safetensors.DecodeToFloat32(v, chunk[k*size:(k+1)*size], dt); err != nil {
					return err
				}
				return nonFinite(info, v[0], first+k)
			}
			_, err := w.Write(chunk)
			return err
		}
		n := len(chunk) / size
		values = slices.Grow(values[:0], n)[:n]
		if err := safetensors.DecodeToFloat32(values, chunk, info.DType); err != nil {
			return err
		}
		// Tested after decoding: an F64 value beyond float32's range
		// becomes infinite only here.
		for k, v := range values {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return nonFinite(info, v, first+k)
			}
		}
		encoded = slices.Grow(encoded[:0], n*int(dt.Size()))[:n*int(dt.Size())]
		safetensors.EncodeFloat32(encoded, values, dt)
		// A finite value beyond dt's range rounds to an infinity, which
		// would make the output unreadable.
		if k := safetensors.FirstNonFinite(encoded, dt); k >= 0 {
			return fmt.Errorf("checkpoint %s: tensor %q: value %v at flat index %d is beyond the range of %s", info.File, info.Name, values[k], first+k, dt)
		}
		_, err := w.Write(encoded)
		return err
	})
}

// load reads the whole model, reporting progress over all its tensors.
func (r *Reader) load(ctx context.Context, opts LoadOptions) (*Model, error) {
	cfg := r.cfg
	m := &Model{Config: cfg, Layers: make([]Layer, cfg.NumLayers), StorageDType: r.dtype}
	if err := r.read(ctx, r.allReqs(m), opts); err != nil {
		return nil, err
	}
	for i := range m.Layers {
		if err := unpadLatent(cfg, i, &m.Layers[i]); err != nil {
			return nil, err
		}
	}
	if cfg.TieWordEmbeddings {
		m.LMHead.W, m.LMHead.W16 = m.Embed, m.Embed16
	}
	return m, nil
}

// allReqs lists every tensor of the model, to be read into m, whose
// Layers must have cfg.NumLayers entries.
func (r *Reader) allReqs(m *Model) []tensorReq {
	reqs := []tensorReq{embedReq(r.cfg, &m.Embed, &m.Embed16), normReq(r.cfg, &m.Norm)}
	if !r.cfg.TieWordEmbeddings {
		reqs = append(reqs, headReq(r.cfg, &m.LMHead.W, &m.LMHead.W16))
	}
	for i := range m.Layers {
		reqs = append(reqs, layerReqs(r.cfg, i, &m.Layers[i])...)
	}
	return reqs
}

// tensorReq is one tensor the model needs, with the shape config.json
// implies. dst16, when not nil, may receive it instead of dst as its
// 16-bit values (matrices of a KeepDType load).
type tensorReq struct {
	name  string
	shape []int
	dst   *[]float32
	dst16 *Bits16
}

// values is the tensor's data as float32 (widened from dst16 if dst is
// empty).
func (r tensorReq) values() []float32 {
	if *r.dst == nil && r.dst16 != nil && r.dst16.Bits != nil {
		return r.dst16.Float32()
	}
	return *r.dst
}

func embedReq(cfg Config, dst *[]float32, dst16 *Bits16) tensorReq {
	return tensorReq{"model.embed_tokens.weight", []int{cfg.VocabSize, cfg.HiddenSize}, dst, dst16}
}

func normReq(cfg Config, dst *[]float32) tensorReq {
	return tensorReq{"model.norm.weight", []int{cfg.HiddenSize}, dst, nil}
}

func headReq(cfg Config, dst *[]float32, dst16 *Bits16) tensorReq {
	return tensorReq{"lm_head.weight", []int{cfg.VocabSize, cfg.HiddenSize}, dst, dst16}
}

// layerReqs lists layer i's tensors, GQA or MLA as cfg says, to be read
// into (or written from) l. It sets l.MLA for MLA configs if nil.
func layerReqs(cfg Config, i int, l *Layer) []tensorReq {
	D, I := cfg.HiddenSize, cfg.IntermediateSize
	p := fmt.Sprintf("model.layers.%d.", i)
	reqs := []tensorReq{
		{p + "input_layernorm.weight", []int{D}, &l.AttnNorm, nil},
		{p + "post_attention_layernorm.weight", []int{D}, &l.MLPNorm, nil},
	}
	linear := func(name string, l *Linear, out, in int, bias bool) {
		reqs = append(reqs, tensorReq{p + name + ".weight", []int{out, in}, &l.W, &l.W16})
		if bias {
			reqs = append(reqs, tensorReq{p + name + ".bias", []int{out}, &l.B, nil})
		}
	}
	if m := cfg.MLA; m != nil {
		H := cfg.NumHeads
		if l.MLA == nil {
			l.MLA = &MLALayer{}
		}
		linear("self_attn.q_proj", &l.MLA.Q, H*(m.QKNopeHeadDim+m.QKRopeHeadDim), D, m.QBias)
		// Stored widths: a padded latent is stripped after reading
		// (unpadLatent) and padded before writing (padLatent).
		dc := m.storedLatent()
		linear("self_attn.kv_a_proj_with_mqa", &l.MLA.KVA, dc+m.QKRopeHeadDim, D, m.KVABias)
		if m.KVANorm {
			reqs = append(reqs, tensorReq{p + "self_attn.kv_a_layernorm.weight", []int{dc}, &l.MLA.KVANorm, nil})
		}
		linear("self_attn.kv_b_proj", &l.MLA.KVB, H*(m.QKNopeHeadDim+m.VHeadDim), dc, false)
		linear("self_attn.o_proj", &l.O, D, H*m.VHeadDim, cfg.OBias)
	} else {
		qOut, kvOut := cfg.NumHeads*cfg.HeadDim, cfg.NumKVHeads*cfg.HeadDim
		linear("self_attn.q_proj", &l.Q, qOut, D, cfg.QKVBias)
		linear("self_attn.k_proj", &l.K, kvOut, D, cfg.QKVBias)
		linear("self_attn.v_proj", &l.V, kvOut, D, cfg.QKVBias)
		linear("self_attn.o_proj", &l.O, D, qOut, cfg.OBias)
	}
	linear("mlp.gate_proj", &l.Gate, I, D, cfg.MLPBias)
	linear("mlp.up_proj", &l.Up, I, D, cfg.MLPBias)
	linear("mlp.down_proj", &l.Down, D, I, cfg.MLPBias)
	return reqs
}

// read loads reqs in order, checking ctx between tensors.
func (r *Reader) read(ctx context.Context, reqs []tensorReq, opts LoadOptions) error {
	for i, req := range reqs {
		if err := ctx.Err(); err != nil {
			return err
		}
		info, err := checkTensor(r.ckpt, req)
		if err != nil {
			return err
		}
		if opts.KeepDType && req.dst16 != nil && (info.DType == safetensors.BF16 || info.DType == safetensors.F16) {
			bits, err := readBits16(r.ckpt, info)
			if err != nil {
				return err
			}
			*req.dst, *req.dst16 = nil, Bits16{DType: info.DType, Bits: bits}
		} else {
			data, err := readTensor(r.ckpt, req)
			if err != nil {
				return err
			}
			*req.dst = data
			if req.dst16 != nil {
				*req.dst16 = Bits16{}
			}
		}
		if opts.Progress != nil {
			opts.Progress(i+1, len(reqs))
		}
	}
	return nil
}

// readBits16 copies the stored values of a BF16 or F16 tensor, refusing
// NaN and infinities as readTensor does (tested on the bits).
func readBits16(ckpt *safetensors.Checkpoint, info safetensors.TensorInfo) ([]uint16, error) {
	n := int(info.Bytes / 2)
	bits := make([]uint16, n)
	err := ckpt.ReadStored(info.Name, func(chunk []byte, first int) error {
		if k := safetensors.FirstNonFinite(chunk, info.DType); k >= 0 {
			v := make([]float32, 1)
			if err := safetensors.DecodeToFloat32(v, chunk[2*k:2*k+2], info.DType); err != nil {
				return err
			}
			return nonFinite(info, v[0], first+k)
		}
		dst := bits[first : first+len(chunk)/2]
		for j := range dst {
			dst[j] = binary.LittleEndian.Uint16(chunk[2*j:])
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return bits, nil
}

// checkTensor checks that the tensor r asks for exists with r's shape and
// a float dtype, from the header alone, and returns where it is stored.
func checkTensor(ckpt *safetensors.Checkpoint, r tensorReq) (safetensors.TensorInfo, error) {
	info, ok := ckpt.Info(r.name)
	if !ok {
		return info, fmt.Errorf("checkpoint %s: tensor %q is missing (config.json implies it exists)", strings.Join(ckpt.Files(), ", "), r.name)
	}
	if !slices.Equal(info.Shape, r.shape) {
		return info, fmt.Errorf("checkpoint %s: tensor %q has shape %v, config.json implies %v", info.File, r.name, info.Shape, r.shape)
	}
	return info, checkDType(info)
}

// checkDType refuses a tensor stored with a non-float dtype. Float32 would
// also decode I64; integer data where a weight belongs means a corrupt or
// mislabelled file, not weights.
func checkDType(info safetensors.TensorInfo) error {
	switch info.DType {
	case safetensors.BF16, safetensors.F16, safetensors.F32, safetensors.F64:
		return nil
	}
	return fmt.Errorf("checkpoint %s: tensor %q has dtype %s, want a float dtype (BF16, F16, F32 or F64)", info.File, info.Name, info.DType)
}

// nonFinite is the error of a tensor holding the non-finite value v at
// flat index i.
func nonFinite(info safetensors.TensorInfo, v float32, i int) error {
	return fmt.Errorf("checkpoint %s: tensor %q has a non-finite value (%v) at flat index %d", info.File, info.Name, v, i)
}

func readTensor(ckpt *safetensors.Checkpoint, r tensorReq) ([]float32, error) {
	info, err := checkTensor(ckpt, r)
	if err != nil {
		return nil, err
	}
	data, err := ckpt.Float32(r.name)
	if err != nil {
		return nil, err
	}
	for i, v := range data {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return nil, nonFinite(info, v, i)
		}
	}
	return data, nil
}

// LayerTensors returns decoder layer i's tensors, stored as dt, under the
// names and shapes that Load expects for cfg (GQA or MLA): the one place
// exporters take tensor names from. It fails if a tensor of l is missing or
// has the wrong length.
func LayerTensors(cfg Config, i int, l *Layer, dt safetensors.DType) ([]safetensors.TensorSpec, error) {
	if cfg.MLA != nil && l.MLA == nil {
		return nil, fmt.Errorf("layer %d: MLA config but the layer has no MLA weights", i)
	}
	l, err := padLatent(cfg, l)
	if err != nil {
		return nil, fmt.Errorf("layer %d: %w", i, err)
	}
	return specs(layerReqs(cfg, i, l), dt)
}

// LayerTensor returns the named tensor of decoder layer i of l, stored as
// dt, as LayerTensors would; it fails if the layer has no such tensor for
// cfg, or l lacks it.
func LayerTensor(cfg Config, i int, l *Layer, name string, dt safetensors.DType) (safetensors.TensorSpec, error) {
	if cfg.MLA != nil && l.MLA != nil && cfg.MLA.LatentPad > 0 && strings.Contains(name, ".self_attn.kv_") {
		var err error
		if l, err = padLatent(cfg, l); err != nil {
			return safetensors.TensorSpec{}, fmt.Errorf("layer %d: %w", i, err)
		}
	}
	for _, req := range layerReqs(cfg, i, l) {
		if req.name == name {
			out, err := specs([]tensorReq{req}, dt)
			if err != nil {
				return safetensors.TensorSpec{}, err
			}
			return out[0], nil
		}
	}
	return safetensors.TensorSpec{}, fmt.Errorf("layer %d has no tensor %q", i, name)
}

// LayerTensorShapes lists decoder layer i's tensor names and shapes for
// cfg, in LayerTensors' order, without any weights: what a streaming writer
// plans a file with before the layer exists.
func LayerTensorShapes(cfg Config, i int) []safetensors.TensorInfo {
	var l Layer
	reqs := layerReqs(cfg, i, &l)
	out := make([]safetensors.TensorInfo, len(reqs))
	for k, r := range reqs {
		out[k] = safetensors.TensorInfo{Name: r.name, Shape: r.shape}
	}
	return out
}

// Tensors returns all of m's tensors, stored as dt, under the names and
// shapes that Load expects (no lm_head with tied embeddings).
func (m *Model) Tensors(dt safetensors.DType) ([]safetensors.TensorSpec, error) {
	cfg := m.Config
	reqs := []tensorReq{embedReq(cfg, &m.Embed, &m.Embed16), normReq(cfg, &m.Norm)}
	if !cfg.TieWordEmbeddings {
		reqs = append(reqs, headReq(cfg, &m.LMHead.W, &m.LMHead.W16))
	}
	out, err := specs(reqs, dt)
	if err != nil {
		return nil, err
	}
	if len(m.Layers) != cfg.NumLayers {
		return nil, fmt.Errorf("model has %d layers, config says %d", len(m.Layers), cfg.NumLayers)
	}
	for i := range m.Layers {
		ls, err := LayerTensors(cfg, i, &m.Layers[i], dt)
		if err != nil {
			return nil, err
		}
		out = append(out, ls...)
	}
	return out, nil
}

func specs(reqs []tensorReq, dt safetensors.DType) ([]safetensors.TensorSpec, error) {
	out := make([]safetensors.TensorSpec, 0, len(reqs))
	for _, r := range reqs {
		n := 1
		for _, d := range r.shape {
			n *= d
		}
		values := r.values()
		if len(values) != n {
			return nil, fmt.Errorf("tensor %q: %d values for shape %v", r.name, len(values), r.shape)
		}
		out = append(out, safetensors.Float32Tensor(r.name, dt, r.shape, values))
	}
	return out, nil
}
