package convert

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/safetensors"
)

// sideFiles are copied from the source next to the converted weights:
// tokenizers and generation settings do not change.
func sideFiles() []string {
	return []string{
		"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
		"tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
	}
}

// copySideFiles copies the present sideFiles from src to dst.
func copySideFiles(src, dst string) ([]string, error) {
	var copied []string
	for _, name := range sideFiles() {
		in, err := os.Open(filepath.Join(src, name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return copied, fmt.Errorf("copy %s: %w", name, err)
		}
		err = func() error {
			defer in.Close()
			out, err := os.Create(filepath.Join(dst, name))
			if err != nil {
				return err
			}
			if _, err := io.Copy(out, in); err != nil {
				out.Close()
				return err
			}
			return out.Close()
		}()
		if err != nil {
			return copied, fmt.Errorf("copy %s: %w", name, err)
		}
		copied = append(copied, name)
	}
	return copied, nil
}

// placeholderLayer has every tensor cfg implies, sized right, all slices
// of one shared zero buffer: enough to plan the file before any layer is
// converted, without holding a model's worth of memory.
func placeholderLayer(cfg model.Config) *model.Layer {
	D, I, H := cfg.HiddenSize, cfg.IntermediateSize, cfg.NumHeads
	m := cfg.MLA
	sizes := []int{D * I, D}
	if m != nil {
		sizes = append(sizes, H*(m.QKNopeHeadDim+m.QKRopeHeadDim)*D, (m.KVLoraRank+m.QKRopeHeadDim)*D, H*(m.QKNopeHeadDim+m.VHeadDim)*m.KVLoraRank, D*H*m.VHeadDim)
	} else {
		sizes = append(sizes, H*cfg.HeadDim*D)
	}
	zero := make([]float32, maxOf(sizes))
	z := func(n int) []float32 { return zero[:n:n] }
	lin := func(out, in int, bias bool) model.Linear {
		l := model.Linear{W: z(out * in)}
		if bias {
			l.B = z(out)
		}
		return l
	}
	l := &model.Layer{
		AttnNorm: z(D), MLPNorm: z(D),
		Gate: lin(I, D, cfg.MLPBias), Up: lin(I, D, cfg.MLPBias), Down: lin(D, I, cfg.MLPBias),
	}
	if m != nil {
		l.MLA = &model.MLALayer{
			Q:   lin(H*(m.QKNopeHeadDim+m.QKRopeHeadDim), D, m.QBias),
			KVA: lin(m.KVLoraRank+m.QKRopeHeadDim, D, m.KVABias),
			KVB: lin(H*(m.QKNopeHeadDim+m.VHeadDim), m.KVLoraRank, false),
		}
		if m.KVANorm {
			l.MLA.KVANorm = z(m.KVLoraRank)
		}
		l.O = lin(D, H*m.VHeadDim, cfg.OBias)
	} else {
		kv := cfg.NumKVHeads * cfg.HeadDim
		l.Q = lin(H*cfg.HeadDim, D, cfg.QKVBias)
		l.K = lin(kv, D, cfg.QKVBias)
		l.V = lin(kv, D, cfg.QKVBias)
		l.O = lin(D, H*cfg.HeadDim, cfg.OBias)
	}
	return l
}

func maxOf(xs []int) int {
	m := 0
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

// lazyLayerTensors plans layer i's tensors with their final names and
// shapes; each Write asks get for the converted layer, which is computed
// when the first of its tensors is written.
func lazyLayerTensors(cfg model.Config, i int, dt safetensors.DType, get func(i int) (*model.Layer, error)) ([]safetensors.TensorSpec, error) {
	plan, err := model.LayerTensors(cfg, i, placeholderLayer(cfg), dt)
	if err != nil {
		return nil, err
	}
	for k := range plan {
		name := plan[k].Name
		plan[k].Write = func(w io.Writer) error {
			l, err := get(i)
			if err != nil {
				return err
			}
			real, err := model.LayerTensors(cfg, i, l, dt)
			if err != nil {
				return err
			}
			for _, s := range real {
				if s.Name == name {
					return s.Write(w)
				}
			}
			return fmt.Errorf("layer %d has no tensor %s", i, name)
		}
	}
	return plan, nil
}
