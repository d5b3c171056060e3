// Package model reads Hugging Face causal-LM checkpoints of the GQA families
// this project converts (Llama, Mistral, Qwen2) and of the DeepSeek-V3 MLA
// layout it converts them to: config.json into one canonical Config, and
// the safetensors weights into float32 layers.
package model

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"

	"github.com/transmla/transmla/rope"
)

// Config is the canonical, validated form of a checkpoint's config.json.
// Aliases between transformers versions (rope_theta at the top level or under
// rope_parameters, rope_scaling "type" or "rope_type") are resolved at parse
// time.
type Config struct {
	// Architecture is the Hugging Face class name, e.g. "LlamaForCausalLM".
	Architecture string
	// HiddenSize is the residual width D (hidden_size).
	HiddenSize int
	// IntermediateSize is the MLP width (intermediate_size).
	IntermediateSize int
	// NumLayers is the number of decoder blocks (num_hidden_layers).
	NumLayers int
	// NumHeads is the number of query heads H (num_attention_heads).
	NumHeads int
	// NumKVHeads is the number of key/value heads G (num_key_value_heads,
	// default H); MLA requires G = H.
	NumKVHeads int
	// HeadDim is explicit in config.json or hidden_size / num_attention_heads;
	// for MLA it is a query/key head's width, qk_nope + qk_rope_head_dim.
	HeadDim int
	// VocabSize is the number of embedding rows (vocab_size).
	VocabSize int
	// MaxPositionEmbeddings is the trained context length.
	MaxPositionEmbeddings int
	// RMSNormEps is the RMSNorm epsilon (rms_norm_eps, default 1e-6).
	RMSNormEps float64
	// Rope describes the rotary embedding (Dim is the rotated part of a head:
	// qk_rope_head_dim for MLA).
	Rope rope.Params
	// TieWordEmbeddings makes the LM head reuse the token embedding.
	TieWordEmbeddings bool
	// QKVBias and OBias say which attention projections carry a bias (for
	// MLA, QKVBias is false and MLAConfig says which of q_proj and
	// kv_a_proj_with_mqa do).
	QKVBias, OBias bool
	// MLPBias says whether gate/up/down projections carry a bias.
	MLPBias bool
	// SlidingWindow limits attention to the last SlidingWindow positions; 0 = full.
	SlidingWindow int
	// HiddenAct is the MLP activation (only "silu" is supported).
	HiddenAct string
	// BOSTokenID and EOSTokenIDs are the special ids, -1 / empty when absent.
	BOSTokenID  int
	EOSTokenIDs []int
	// MLA is set for Multi-head Latent Attention checkpoints (DeepSeek-V3
	// layout) and nil for GQA ones.
	MLA *MLAConfig
}

// KVCacheValuesPerToken is the number of cached values per token over all
// layers: 2·n_kv·d_h·layers for GQA, (d_c + d_r)·layers for MLA.
func (c Config) KVCacheValuesPerToken() int {
	if c.MLA != nil {
		return (c.MLA.KVLoraRank + c.MLA.QKRopeHeadDim) * c.NumLayers
	}
	return 2 * c.NumKVHeads * c.HeadDim * c.NumLayers
}

// rawConfig mirrors the config.json keys we read, across transformers versions.
type rawConfig struct {
	Architectures         []string        `json:"architectures"`
	HiddenSize            int             `json:"hidden_size"`
	IntermediateSize      int             `json:"intermediate_size"`
	NumHiddenLayers       int             `json:"num_hidden_layers"`
	NumAttentionHeads     int             `json:"num_attention_heads"`
	NumKeyValueHeads      *int            `json:"num_key_value_heads"`
	HeadDim               *int            `json:"head_dim"`
	VocabSize             int             `json:"vocab_size"`
	MaxPositionEmbeddings int             `json:"max_position_embeddings"`
	RMSNormEps            *float64        `json:"rms_norm_eps"`
	RopeTheta             *float64        `json:"rope_theta"`
	RopeScaling           map[string]any  `json:"rope_scaling"`
	RopeParameters        map[string]any  `json:"rope_parameters"`
	PartialRotaryFactor   *float64        `json:"partial_rotary_factor"`
	TieWordEmbeddings     *bool           `json:"tie_word_embeddings"`
	AttentionBias         *bool           `json:"attention_bias"`
	MLPBias               *bool           `json:"mlp_bias"`
	SlidingWindow         *int            `json:"sliding_window"`
	UseSlidingWindow      *bool           `json:"use_sliding_window"`
	HiddenAct             string          `json:"hidden_act"`
	BOSTokenID            *int            `json:"bos_token_id"`
	EOSTokenID            json.RawMessage `json:"eos_token_id"`
	// DeepSeek-V3 (MLA) keys; see deepseekV3.Normalize.
	KVLoraRank         *int            `json:"kv_lora_rank"`
	QLoraRank          json.RawMessage `json:"q_lora_rank"`
	QKRopeHeadDim      *int            `json:"qk_rope_head_dim"`
	QKNopeHeadDim      *int            `json:"qk_nope_head_dim"`
	VHeadDim           *int            `json:"v_head_dim"`
	RopeInterleave     *bool           `json:"rope_interleave"`
	NRoutedExperts     json.RawMessage `json:"n_routed_experts"`
	FirstKDenseReplace *int            `json:"first_k_dense_replace"`
	TransMLA           *transMLAMeta   `json:"transmla"`
}

// LoadConfig reads dir/config.json (or a config.json path).
func LoadConfig(path string) (Config, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		path = filepath.Join(path, "config.json")
	}
	data, err := readConfigFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read model config: %w", err)
	}
	return ParseConfig(path, data)
}

// maxConfigSize bounds config.json; real ones are a few kilobytes.
const maxConfigSize = 16 << 20

// readConfigFile reads path, refusing what cannot be a config.json: a
// FIFO or device, which could block or never end, or a huge file.
func readConfigFile(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if fi.Size() > maxConfigSize {
		return nil, fmt.Errorf("%s is %d bytes, over the %d-byte limit for a config", path, fi.Size(), maxConfigSize)
	}
	return os.ReadFile(path)
}

// ParseConfig parses config.json bytes; name is used in error messages.
func ParseConfig(name string, data []byte) (Config, error) {
	var raw rawConfig
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&raw); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return Config{}, fmt.Errorf("%s: key %q: want %s, got a JSON %s", name, typeErr.Field, jsonKind(typeErr.Type), typeErr.Value)
		}
		return Config{}, fmt.Errorf("%s: invalid JSON: %w", name, err)
	}
	if len(raw.Architectures) == 0 {
		return Config{}, fmt.Errorf("%s: no \"architectures\" entry (supported: %s)", name, strings.Join(Supported(), ", "))
	}
	archName := raw.Architectures[0]
	arch, ok := lookup(archName)
	if !ok {
		return Config{}, fmt.Errorf("%s: unsupported architecture %q (supported: %s)", name, archName, strings.Join(Supported(), ", "))
	}
	c, err := raw.canonical(archName)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", name, err)
	}
	if err := arch.Normalize(&c, &raw); err != nil {
		return Config{}, fmt.Errorf("%s: %s: %w", name, archName, err)
	}
	if err := c.validate(); err != nil {
		return Config{}, fmt.Errorf("%s: %w", name, err)
	}
	return c, nil
}

func (r *rawConfig) canonical(arch string) (Config, error) {
	c := Config{
		Architecture:          arch,
		HiddenSize:            r.HiddenSize,
		IntermediateSize:      r.IntermediateSize,
		NumLayers:             r.NumHiddenLayers,
		NumHeads:              r.NumAttentionHeads,
		VocabSize:             r.VocabSize,
		MaxPositionEmbeddings: r.MaxPositionEmbeddings,
		HiddenAct:             r.HiddenAct,
		BOSTokenID:            -1,
	}
	if c.HiddenAct == "" {
		c.HiddenAct = "silu"
	}
	c.NumKVHeads = c.NumHeads
	if r.NumKeyValueHeads != nil {
		c.NumKVHeads = *r.NumKeyValueHeads
	}
	if r.HeadDim != nil && *r.HeadDim > 0 {
		c.HeadDim = *r.HeadDim
	} else if c.NumHeads > 0 && r.QKNopeHeadDim == nil && r.QKRopeHeadDim == nil {
		// MLA families size their heads from qk_nope/qk_rope_head_dim instead.
		if c.HiddenSize%c.NumHeads != 0 {
			return c, fmt.Errorf("hidden_size %d is not divisible by num_attention_heads %d and no head_dim is given", c.HiddenSize, c.NumHeads)
		}
		c.HeadDim = c.HiddenSize / c.NumHeads
	}
	c.RMSNormEps = 1e-6
	if r.RMSNormEps != nil {
		c.RMSNormEps = *r.RMSNormEps
	}
	if r.TieWordEmbeddings != nil {
		c.TieWordEmbeddings = *r.TieWordEmbeddings
	}
	if r.AttentionBias != nil && *r.AttentionBias {
		c.QKVBias, c.OBias = true, true
	}
	if r.MLPBias != nil {
		c.MLPBias = *r.MLPBias
	}
	if r.SlidingWindow != nil && (r.UseSlidingWindow == nil || *r.UseSlidingWindow) {
		c.SlidingWindow = *r.SlidingWindow
	}
	if r.BOSTokenID != nil {
		c.BOSTokenID = *r.BOSTokenID
	}
	eos, err := parseIDs(r.EOSTokenID)
	if err != nil {
		return c, fmt.Errorf("eos_token_id: %w", err)
	}
	c.EOSTokenIDs = eos
	rp, err := r.ropeParams(c.HeadDim)
	if err != nil {
		return c, err
	}
	c.Rope = rp
	return c, nil
}

// jsonKind names a Go type the way a config.json author thinks of it.
func jsonKind(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Map, reflect.Struct:
		return "an object"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Pointer:
		return jsonKind(t.Elem())
	default:
		return "a number"
	}
}

// oneLine returns the raw JSON value v compacted onto one line, as error
// messages quote it (the CLI prints errors as one line).
func oneLine(v json.RawMessage) string {
	var b bytes.Buffer
	if err := json.Compact(&b, v); err != nil {
		return fmt.Sprintf("%q", v)
	}
	return b.String()
}

// jsonValue formats a decoded JSON value as JSON, on one line.
func jsonValue(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprintf("%q", fmt.Sprint(v))
	}
	return string(b)
}

// parseIDs accepts null, a number or a list of numbers.
func parseIDs(raw json.RawMessage) ([]int, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var one int
	if err := json.Unmarshal(raw, &one); err == nil {
		return []int{one}, nil
	}
	var many []int
	if err := json.Unmarshal(raw, &many); err != nil {
		return nil, fmt.Errorf("want an integer or a list of integers, got %s", oneLine(raw))
	}
	return many, nil
}

// ropeParams merges rope_theta / rope_scaling (transformers 4.x) and
// rope_parameters (transformers 5.x) into one description.
func (r *rawConfig) ropeParams(headDim int) (rope.Params, error) {
	p := rope.Params{Dim: headDim, Theta: 10000}
	if r.RopeTheta != nil {
		p.Theta = *r.RopeTheta
	}
	if r.PartialRotaryFactor != nil {
		p.Dim = int(float64(headDim) * *r.PartialRotaryFactor)
	}
	var scaling map[string]any
	switch {
	case r.RopeParameters != nil:
		scaling = r.RopeParameters
		if t, ok := r.RopeParameters["rope_theta"]; ok {
			v, ok := t.(float64)
			if !ok {
				return p, fmt.Errorf("rope_parameters.rope_theta: want a number, got %s", jsonValue(t))
			}
			p.Theta = v
		}
		if f, ok := r.RopeParameters["partial_rotary_factor"].(float64); ok {
			p.Dim = int(float64(headDim) * f)
		}
	case r.RopeScaling != nil:
		scaling = r.RopeScaling
	}
	if scaling == nil {
		return p, nil
	}
	s, err := parseScaling(scaling)
	if err != nil {
		return p, err
	}
	if s.OriginalMaxPositionEmbeddings == 0 {
		s.OriginalMaxPositionEmbeddings = r.MaxPositionEmbeddings
	}
	if !identityScaling(s) {
		p.Scaling = s
	}
	return p, nil
}

// identityScaling reports whether s rotates exactly as no scaling does: a
// factor of 1 in linear, llama3 or yarn scaling (yarn's attention factor
// unset or 1; its mscale terms are 1 at factor 1). DeepSeek-V3 exports
// declare plain RoPE as such a YaRN (exportScaling), and reading it gives
// plain RoPE back.
func identityScaling(s rope.Scaling) bool {
	switch s.Type {
	case "linear", "llama3":
		return s.Factor == 1
	case "yarn":
		return s.Factor == 1 && (s.AttentionFactor == 0 || s.AttentionFactor == 1)
	}
	return false
}

func parseScaling(m map[string]any) (rope.Scaling, error) {
	var s rope.Scaling
	typ, _ := m["rope_type"].(string)
	if typ == "" {
		typ, _ = m["type"].(string)
	}
	s.Type = typ
	num := func(key string, dst *float64) error {
		v, ok := m[key]
		if !ok || v == nil {
			return nil
		}
		f, ok := v.(float64)
		if !ok {
			return fmt.Errorf("rope scaling %q: want a number, got %s", key, jsonValue(v))
		}
		*dst = f
		return nil
	}
	var orig float64
	for _, kv := range []struct {
		key string
		dst *float64
	}{
		{"factor", &s.Factor},
		{"low_freq_factor", &s.LowFreqFactor},
		{"high_freq_factor", &s.HighFreqFactor},
		{"original_max_position_embeddings", &orig},
		{"beta_fast", &s.BetaFast},
		{"beta_slow", &s.BetaSlow},
		{"attention_factor", &s.AttentionFactor},
		{"mscale", &s.MScale},
		{"mscale_all_dim", &s.MScaleAllDim},
	} {
		if err := num(kv.key, kv.dst); err != nil {
			return s, err
		}
	}
	s.OriginalMaxPositionEmbeddings = int(orig)
	if t, ok := m["truncate"].(bool); ok && !t {
		s.NoTruncate = true
	}
	if s.Type != "" && !slices.Contains(rope.Types, s.Type) {
		return s, fmt.Errorf("unsupported rope scaling type %q (supported: %s)", s.Type, strings.Join(rope.Types, ", "))
	}
	return s, nil
}

// maxHeadDim bounds head_dim (and so the rotary dimension); real models
// use at most a few hundred.
const maxHeadDim = 1 << 16

func (c Config) validate() error {
	positive := []struct {
		key string
		v   int
	}{
		{"hidden_size", c.HiddenSize},
		{"intermediate_size", c.IntermediateSize},
		{"num_hidden_layers", c.NumLayers},
		{"num_attention_heads", c.NumHeads},
		{"num_key_value_heads", c.NumKVHeads},
		{"head_dim", c.HeadDim},
		{"vocab_size", c.VocabSize},
	}
	for _, p := range positive {
		if p.v <= 0 {
			return fmt.Errorf("%s must be positive, got %d", p.key, p.v)
		}
	}
	// The RoPE frequencies are allocated per rotated pair: bound the head
	// before a corrupt config sizes an allocation.
	if c.HeadDim > maxHeadDim {
		return fmt.Errorf("head_dim %d exceeds %d", c.HeadDim, maxHeadDim)
	}
	if c.NumHeads%c.NumKVHeads != 0 {
		return fmt.Errorf("num_attention_heads %d is not a multiple of num_key_value_heads %d", c.NumHeads, c.NumKVHeads)
	}
	if c.Rope.Dim <= 0 || c.Rope.Dim%2 != 0 || c.Rope.Dim > c.HeadDim {
		return fmt.Errorf("rotary dimension %d must be even and in (0, head_dim %d]", c.Rope.Dim, c.HeadDim)
	}
	if _, _, err := c.Rope.InvFreq(); err != nil {
		return err
	}
	if !(c.RMSNormEps > 0) {
		return fmt.Errorf("rms_norm_eps must be positive, got %v", c.RMSNormEps)
	}
	if c.HiddenAct != "silu" {
		return fmt.Errorf("hidden_act %q is not supported (supported: silu)", c.HiddenAct)
	}
	if c.SlidingWindow < 0 {
		return fmt.Errorf("sliding_window must not be negative, got %d", c.SlidingWindow)
	}
	if c.MLA != nil {
		return c.validateMLA()
	}
	return nil
}

// architecture is one supported model family. It adjusts the generic config
// to the family's defaults and rules.
type architecture interface {
	// Name is the Hugging Face class name in config.json's "architectures".
	Name() string
	// Normalize applies the family's defaults and rejects what it cannot run.
	Normalize(c *Config, raw *rawConfig) error
}

// registry maps architecture names to families; filled by init and read-only after.
var registry = map[string]architecture{}

func register(a architecture) {
	if _, dup := registry[a.Name()]; dup {
		panic("model: architecture registered twice: " + a.Name())
	}
	registry[a.Name()] = a
}

func lookup(name string) (architecture, bool) {
	a, ok := registry[name]
	return a, ok
}

// Supported lists the supported architecture names, sorted.
func Supported() []string {
	names := make([]string, 0, len(registry))
	for n := range registry {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
