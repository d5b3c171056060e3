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
// tokenizers, chat templates and generation settings do not change.
func sideFiles() []string {
	return []string{
		"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
		"tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
		"chat_template.jinja", "chat_template.json", "generation_config.json",
	}
}

// copySideFiles copies the present sideFiles from src to dst.
func copySideFiles(src, dst string) ([]string, error) {
	var copied []string
	for _, name := range sideFiles() {
		path := filepath.Join(src, name)
		fi, err := os.Stat(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err == nil && !fi.Mode().IsRegular() {
			// Opening a FIFO would block; a device might never end.
			err = fmt.Errorf("%s is not a regular file", path)
		}
		if err != nil {
			return copied, fmt.Errorf("copy %s: %w", name, err)
		}
		in, err := os.Open(path)
		if err != nil {
			return copied, fmt.Errorf("copy %s: %w", name, err)
		}
		err = func() error {
			defer in.Close()
			out, err := os.Create(filepath.Join(dst, name))
			if err != nil {
				return err
			}
			_, err = io.Copy(out, in)
			if err == nil {
				err = out.Sync() // the output is renamed into place as complete
			}
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			return err
		}()
		if err != nil {
			return copied, fmt.Errorf("copy %s: %w", name, err)
		}
		copied = append(copied, name)
	}
	return copied, nil
}

// convertedTensor plans tensor t of converted layer i; its Write asks get
// for the layer, which is computed when the first of its tensors is
// written.
func convertedTensor(cfg model.Config, i int, t safetensors.TensorInfo, dt safetensors.DType, get func(i int) (*model.Layer, error)) safetensors.TensorSpec {
	return safetensors.TensorSpec{Name: t.Name, DType: dt, Shape: t.Shape, Write: func(w io.Writer) error {
		l, err := get(i)
		if err != nil {
			return err
		}
		spec, err := model.LayerTensor(cfg, i, l, t.Name, dt)
		if err != nil {
			return err
		}
		return spec.Write(w)
	}}
}
