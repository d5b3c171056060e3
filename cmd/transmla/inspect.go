package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/safetensors"
)

type layerShapes struct {
	Layer int `json:"layer"`
	// Weights maps each attention projection (q_proj, k_proj, … for GQA;
	// q_proj, kv_a_proj_with_mqa, kv_b_proj, … for MLA) to its shape.
	Weights map[string][]int `json:"weights"`
	Bias    map[string][]int `json:"biases,omitempty"`
}

// attentionTensors names the attention weights of cfg's layers.
func attentionTensors(cfg model.Config) []string {
	if cfg.MLA == nil {
		return []string{"q_proj", "k_proj", "v_proj", "o_proj"}
	}
	names := []string{"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
	if cfg.MLA.KVANorm {
		names = append(names, "kv_a_layernorm")
	}
	return names
}

type inspectReport struct {
	Model                 string        `json:"model"`
	Architecture          string        `json:"architecture"`
	Parameters            int64         `json:"parameters"`
	Tensors               int           `json:"tensors"`
	Files                 []string      `json:"files"`
	DType                 string        `json:"dtype"`
	Layers                int           `json:"layers"`
	HiddenSize            int           `json:"hidden_size"`
	Heads                 int           `json:"heads"`
	KVHeads               int           `json:"kv_heads"`
	HeadDim               int           `json:"head_dim"`
	Intermediate          int           `json:"intermediate_size"`
	Vocab                 int           `json:"vocab_size"`
	RopeTheta             float64       `json:"rope_theta"`
	RopeScaling           string        `json:"rope_scaling"`
	TiedEmbeddings        bool          `json:"tie_word_embeddings"`
	QKVBias               bool          `json:"qkv_bias"`
	KVLoraRank            int           `json:"kv_lora_rank,omitempty"`
	QKRopeHeadDim         int           `json:"qk_rope_head_dim,omitempty"`
	KVCacheValuesPerToken int           `json:"kv_cache_values_per_token"`
	KVCacheBytesPerToken  int64         `json:"kv_cache_bytes_per_token"`
	Attention             []layerShapes `json:"attention"`

	tensorNames []string
}

func inspectCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:        "inspect",
		Usage:       "architecture, parameter count, attention shapes and KV-cache size of a checkpoint",
		ArgsUsage:   "MODEL",
		Description: `Reads only config.json and the safetensors headers; no weights are loaded.`,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object instead of text"},
		},
		Action: func(c *cli.Context) error {
			dir, err := modelArg(c)
			if err != nil {
				return err
			}
			rep, err := inspect(dir)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return writeJSON(c.App.Writer, rep)
			}
			w := c.App.Writer
			fmt.Fprintf(w, "model         %s\n", rep.Model)
			fmt.Fprintf(w, "architecture  %s, %d layers, hidden %d, MLP %d, vocab %d\n", rep.Architecture, rep.Layers, rep.HiddenSize, rep.Intermediate, rep.Vocab)
			if rep.KVLoraRank > 0 {
				fmt.Fprintf(w, "attention     MLA: %d heads × %d (incl. rope %d), latent kv_lora_rank %d\n", rep.Heads, rep.HeadDim, rep.QKRopeHeadDim, rep.KVLoraRank)
			} else {
				fmt.Fprintf(w, "attention     %d query heads × %d, %d KV heads (group %d), q/k/v bias %v\n", rep.Heads, rep.HeadDim, rep.KVHeads, rep.Heads/rep.KVHeads, rep.QKVBias)
			}
			fmt.Fprintf(w, "rope          theta %g, scaling %s\n", rep.RopeTheta, rep.RopeScaling)
			fmt.Fprintf(w, "parameters    %d (%.1fM) in %d tensors, %s, %s\n", rep.Parameters, float64(rep.Parameters)/1e6, rep.Tensors, rep.DType, strings.Join(rep.Files, ", "))
			fmt.Fprintf(w, "KV cache      %d values = %d B per token\n", rep.KVCacheValuesPerToken, rep.KVCacheBytesPerToken)
			names := rep.tensorNames
			fmt.Fprintf(w, "layer")
			for _, n := range names {
				fmt.Fprintf(w, "  %-18s", n)
			}
			fmt.Fprintln(w)
			for _, l := range rep.Attention {
				fmt.Fprintf(w, "%5d", l.Layer)
				for _, n := range names {
					fmt.Fprintf(w, "  %-18s", shape(l.Weights[n]))
				}
				fmt.Fprintln(w)
			}
			return nil
		},
	})
}

func shape(s []int) string {
	parts := make([]string, len(s))
	for i, v := range s {
		parts[i] = fmt.Sprint(v)
	}
	return strings.Join(parts, "×")
}

func inspect(dir string) (inspectReport, error) {
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		return inspectReport{}, err
	}
	ckpt, err := safetensors.Open(dir)
	if err != nil {
		return inspectReport{}, err
	}
	defer ckpt.Close()
	rep := inspectReport{
		Model: dir, Architecture: cfg.Architecture, Files: ckpt.Files(),
		Layers: cfg.NumLayers, HiddenSize: cfg.HiddenSize, Heads: cfg.NumHeads, KVHeads: cfg.NumKVHeads,
		HeadDim: cfg.HeadDim, Intermediate: cfg.IntermediateSize, Vocab: cfg.VocabSize,
		RopeTheta: cfg.Rope.Theta, RopeScaling: "none", TiedEmbeddings: cfg.TieWordEmbeddings, QKVBias: cfg.QKVBias,
		KVCacheValuesPerToken: cfg.KVCacheValuesPerToken(),
		tensorNames:           attentionTensors(cfg),
	}
	if cfg.MLA != nil {
		rep.KVLoraRank, rep.QKRopeHeadDim = cfg.MLA.KVLoraRank, cfg.MLA.QKRopeHeadDim
	}
	if t := cfg.Rope.Scaling.Type; t != "" && t != "default" {
		rep.RopeScaling = fmt.Sprintf("%s ×%g", t, cfg.Rope.Scaling.Factor)
	}
	dtypes := map[string]int64{}
	for _, name := range ckpt.Names() {
		info, _ := ckpt.Info(name)
		n := int64(1)
		for _, d := range info.Shape {
			n *= int64(d)
		}
		rep.Parameters += n
		rep.Tensors++
		dtypes[info.DType.String()] += n
	}
	for _, dt := range slices.Sorted(maps.Keys(dtypes)) {
		if n := dtypes[dt]; rep.DType == "" || n > dtypes[rep.DType] {
			rep.DType = dt
		}
	}
	for i := range cfg.NumLayers {
		p := fmt.Sprintf("model.layers.%d.self_attn.", i)
		get := func(name string) []int {
			info, ok := ckpt.Info(p + name)
			if !ok {
				return nil
			}
			return info.Shape
		}
		ls := layerShapes{Layer: i, Weights: map[string][]int{}}
		for _, b := range rep.tensorNames {
			w := get(b + ".weight")
			if w == nil {
				return rep, fmt.Errorf("checkpoint %s: layer %d lacks %s%s.weight", dir, i, p, b)
			}
			ls.Weights[b] = w
			if s := get(b + ".bias"); s != nil {
				if ls.Bias == nil {
					ls.Bias = map[string][]int{}
				}
				ls.Bias[b] = s
			}
		}
		rep.Attention = append(rep.Attention, ls)
	}
	dt, _ := model.AttentionDType(ckpt) // present: layer 0 was checked above
	rep.KVCacheBytesPerToken = cfg.KVCacheBytesPerToken(dt)
	return rep, nil
}
