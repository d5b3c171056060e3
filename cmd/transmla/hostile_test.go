package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/internal/desttest"
	"github.com/transmla/transmla/safetensors"
)

// storedTensor is one tensor of a checkpoint with its bytes as stored, so
// that a test can rewrite a checkpoint exactly and corrupt one detail.
type storedTensor struct {
	name  string
	dtype safetensors.DType
	shape []int
	data  []byte
}

// readStored returns every tensor of the checkpoint in dir, in name order.
func readStored(t *testing.T, dir string) []storedTensor {
	t.Helper()
	c, err := safetensors.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var out []storedTensor
	for _, name := range c.Names() {
		info, _ := c.Info(name)
		raw, err := c.Raw(name)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, storedTensor{name, info.DType, info.Shape, append([]byte(nil), raw...)})
	}
	return out
}

// writeStored replaces the weights in dir by tensors, written with opts,
// removing the files of the previous layout.
func writeStored(t *testing.T, dir string, tensors []storedTensor, opts safetensors.WriteOptions) {
	t.Helper()
	matches, _ := filepath.Glob(filepath.Join(dir, "model*.safetensors*"))
	for _, m := range matches {
		if err := os.Remove(m); err != nil {
			t.Fatal(err)
		}
	}
	specs := make([]safetensors.TensorSpec, len(tensors))
	for i, st := range tensors {
		specs[i] = safetensors.TensorSpec{Name: st.name, DType: st.dtype, Shape: st.shape, Write: func(w io.Writer) error {
			_, err := w.Write(st.data)
			return err
		}}
	}
	if err := safetensors.WriteCheckpoint(context.Background(), dir, specs, opts); err != nil {
		t.Fatal(err)
	}
}

// editStored rewrites dir's single-file checkpoint through edit.
func editStored(t *testing.T, dir string, edit func([]storedTensor) []storedTensor) {
	t.Helper()
	writeStored(t, dir, edit(readStored(t, dir)), safetensors.WriteOptions{})
}

// setBF16 stores the bfloat16 bit pattern bits as element i of the named
// tensor.
func setBF16(name string, i int, bits uint16) func([]storedTensor) []storedTensor {
	return func(ts []storedTensor) []storedTensor {
		for _, st := range ts {
			if st.name == name {
				binary.LittleEndian.PutUint16(st.data[2*i:], bits)
			}
		}
		return ts
	}
}

// retype stores the named tensor as dt with the same shape (zero values).
func retype(name string, dt safetensors.DType) func([]storedTensor) []storedTensor {
	return func(ts []storedTensor) []storedTensor {
		for i, st := range ts {
			if st.name == name {
				n := int64(len(st.data)) / int64(st.dtype.Size())
				ts[i].dtype, ts[i].data = dt, make([]byte, n*int64(dt.Size()))
			}
		}
		return ts
	}
}

// reshape gives the named tensor another shape of the same size.
func reshape(name string, shape ...int) func([]storedTensor) []storedTensor {
	return func(ts []storedTensor) []storedTensor {
		for i, st := range ts {
			if st.name == name {
				ts[i].shape = shape
			}
		}
		return ts
	}
}

// setConfig sets config.json's key to the JSON value v.
func setConfig(t *testing.T, dir, key string, v any) {
	t.Helper()
	p := filepath.Join(dir, "config.json")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(data, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg[key] = v
	if data, err = json.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	writeFile(t, p, data)
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// editFile rewrites the file at path through edit.
func editFile(t *testing.T, path string, edit func([]byte) []byte) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, edit(data))
}

// copyDir copies the regular files of src into a new directory.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "model")
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	return dst
}

// shard3 rewrites dir's checkpoint as three shards of the default
// synthetic model (model-0000k-of-00003.safetensors) plus an index.
func shard3(t *testing.T, dir string) {
	t.Helper()
	writeStored(t, dir, readStored(t, dir), safetensors.WriteOptions{MaxShardBytes: 2 << 20})
	if _, err := os.Stat(filepath.Join(dir, "model-00003-of-00003.safetensors")); err != nil {
		t.Fatalf("expected three shards: %v", err)
	}
}

// TestHostileCheckpoints runs the CLI on corrupted copies of the synthetic
// checkpoint. Each must fail with exit code 1 and one error line that
// names the file and, where one is at fault, the tensor or key — never a
// panic. A failed convert must leave nothing in the output's parent
// directory, and, with --force over an earlier output, that output byte
// for byte. In the wanted phrases, DIR stands for the corrupted
// checkpoint's directory.
func TestHostileCheckpoints(t *testing.T) {
	// Tensors of the default synthetic checkpoint that the cases corrupt.
	const (
		embedName = "model.embed_tokens.weight"
		qName     = "model.layers.1.self_attn.q_proj.weight"
		kName     = "model.layers.2.self_attn.k_proj.weight"
		vName     = "model.layers.3.self_attn.v_proj.weight"
		downName  = "model.layers.0.mlp.down_proj.weight"
		normName  = "model.norm.weight"
		headName  = "lm_head.weight"
	)
	// bfloat16 bit patterns of non-finite values.
	const bf16NaN, bf16PosInf, bf16NegInf = 0x7fc0, 0x7f80, 0xff80
	base := synthetic(t)
	calib := calibFile(t)
	// A complete earlier output, which failed runs with --force must keep.
	previous := filepath.Join(t.TempDir(), "previous")
	if _, stderr, code := run(t, "convert", base, "--dc", "48", "-o", previous); code != 0 {
		t.Fatalf("convert: %s", stderr)
	}
	weights := "DIR" + string(filepath.Separator) + "model.safetensors"
	shard := func(k int) string {
		return "DIR" + string(filepath.Separator) + "model-0000" + string(rune('0'+k)) + "-of-00003.safetensors"
	}
	index := "DIR" + string(filepath.Separator) + "model.safetensors.index.json"
	convertArgs := []string{"convert", "DIR", "--dc", "32"}
	for _, tc := range []struct {
		name   string
		mutate func(t *testing.T, dir string)
		args   []string // default convertArgs; -o OUT is appended to convert
		want   []string
	}{
		// Truncated and bit-flipped files.
		{"truncated inside the length field", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte { return b[:5] })
		}, nil, []string{weights, "file is 5 bytes, shorter than the 8-byte header length field"}},
		{"truncated inside the header", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte { return b[:200] })
		}, nil, []string{weights, "runs past the end of the 200-byte file"}},
		{"truncated inside the data", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte { return b[:len(b)/2] })
		}, nil, []string{weights, "out of range of the"}},
		{"last byte missing", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte { return b[:len(b)-1] })
		}, nil, []string{weights, `tensor "lm_head.weight": data_offsets [5673984 5805568] out of range of the 5805567-byte data area`}},
		{"empty weights file", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, "model.safetensors"), nil)
		}, nil, []string{weights, "file is 0 bytes"}},
		{"flipped bit in the header length", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte { b[6] ^= 0x10; return b })
		}, nil, []string{weights, "header length", "exceeds"}},
		{"flipped byte opening the header", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte { b[8] ^= 0xff; return b })
		}, nil, []string{weights, "header is not valid UTF-8"}},
		{"flipped byte in a dtype", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte {
				return flipAfter(t, b, `"`+kName+`":{"dtype":"`, 1, 0x08) // BF16 → BN16
			})
		}, nil, []string{weights, `tensor "` + kName + `"`, `unknown dtype "BN16"`}},
		{"flipped byte in a shape", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte {
				return flipAfter(t, b, `"`+kName+`":{"dtype":"BF16","shape":[`, 0, 0x01) // 64 → 74
			})
		}, nil, []string{weights, `tensor "` + kName + `"`, "shape [74 256] of BF16 needs 37888 bytes, data_offsets give 32768"}},
		{"flipped byte in data_offsets", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte {
				return flipAfter(t, b, `"`+kName+`":{"dtype":"BF16","shape":[64,256],"data_offsets":[`, 0, 0x02)
			})
		}, nil, []string{weights, `"` + kName + `"`}},
		{"flipped byte in a tensor name", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "model.safetensors"), func(b []byte) []byte {
				return flipAfter(t, b, `"model.layers.2.self_attn.k`, 0, 0x01) // k_proj → j_proj
			})
		}, nil, []string{weights, `tensor "` + kName + `" is missing (config.json implies it exists)`}},
		{"weights file is a FIFO", func(t *testing.T, dir string) {
			p := filepath.Join(dir, "model.safetensors")
			os.Remove(p)
			desttest.Mkfifo(t, p)
		}, nil, []string{weights, "not a regular file"}},
		{"no weights", func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, "model.safetensors"))
		}, nil, []string{"DIR", "no model.safetensors.index.json or model.safetensors in directory"}},

		// Sharded checkpoints.
		{"shard missing", func(t *testing.T, dir string) {
			shard3(t, dir)
			os.Remove(filepath.Join(dir, "model-00002-of-00003.safetensors"))
		}, nil, []string{index, "shard model-00002-of-00003.safetensors (listed for tensor", "no such file or directory"}},
		{"truncated shard", func(t *testing.T, dir string) {
			shard3(t, dir)
			editFile(t, filepath.Join(dir, "model-00003-of-00003.safetensors"), func(b []byte) []byte { return b[:len(b)-100] })
		}, nil, []string{shard(3), "out of range"}},
		{"tensor in two shards", func(t *testing.T, dir string) {
			shard3(t, dir)
			ts := readStored(t, dir)
			// Write the third shard again with a copy of layer 0's q_proj.
			c, err := safetensors.Open(filepath.Join(dir, "model-00003-of-00003.safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			names := c.Names()
			c.Close()
			var third []storedTensor
			for _, st := range ts {
				if st.name == "model.layers.0.self_attn.q_proj.weight" || slices.Contains(names, st.name) {
					third = append(third, st)
				}
			}
			sub := t.TempDir()
			writeStored(t, sub, third, safetensors.WriteOptions{})
			if err := os.Rename(filepath.Join(sub, "model.safetensors"), filepath.Join(dir, "model-00003-of-00003.safetensors")); err != nil {
				t.Fatal(err)
			}
		}, nil, []string{index, `tensor "model.layers.0.self_attn.q_proj.weight" is stored in both`, shard(1), shard(3)}},
		{"index is not JSON", func(t *testing.T, dir string) {
			shard3(t, dir)
			editFile(t, filepath.Join(dir, "model.safetensors.index.json"), func(b []byte) []byte { return b[:len(b)/2] })
		}, nil, []string{index, "index is not a JSON object", "unexpected end of JSON input"}},
		{"index points outside the checkpoint", func(t *testing.T, dir string) {
			shard3(t, dir)
			editFile(t, filepath.Join(dir, "model.safetensors.index.json"), func(b []byte) []byte {
				return []byte(strings.Replace(string(b), `"model-00001-of-00003.safetensors"`, `"../../etc/passwd"`, 1))
			})
		}, nil, []string{index, `shard path "../../etc/passwd" is not a file inside the checkpoint directory`}},

		// Tensors that contradict what the model needs.
		{"int32 weight", func(t *testing.T, dir string) { editStored(t, dir, retype(qName, safetensors.I32)) },
			nil, []string{weights, `tensor "` + qName + `" has dtype I32, want a float dtype (BF16, F16, F32 or F64)`}},
		{"int64 weight", func(t *testing.T, dir string) { editStored(t, dir, retype(downName, safetensors.I64)) },
			nil, []string{weights, `tensor "` + downName + `" has dtype I64, want a float dtype`}},
		{"transposed weight", func(t *testing.T, dir string) { editStored(t, dir, reshape(kName, 256, 64)) },
			nil, []string{weights, `tensor "` + kName + `" has shape [256 64], config.json implies [64 256]`}},
		{"flattened weight", func(t *testing.T, dir string) { editStored(t, dir, reshape(normName, 16, 16)) },
			nil, []string{weights, `tensor "` + normName + `" has shape [16 16], config.json implies [256]`}},
		{"NaN in v_proj", func(t *testing.T, dir string) { editStored(t, dir, setBF16(vName, 1000, bf16NaN)) },
			nil, []string{weights, `tensor "` + vName + `" has a non-finite value (NaN) at flat index 1000`}},
		{"+Inf in down_proj", func(t *testing.T, dir string) { editStored(t, dir, setBF16(downName, 7, bf16PosInf)) },
			nil, []string{weights, `tensor "` + downName + `" has a non-finite value (+Inf) at flat index 7`}},
		{"-Inf in the embedding", func(t *testing.T, dir string) { editStored(t, dir, setBF16(embedName, 0, bf16NegInf)) },
			nil, []string{weights, `tensor "` + embedName + `" has a non-finite value (-Inf) at flat index 0`}},
		{"NaN in the final norm", func(t *testing.T, dir string) { editStored(t, dir, setBF16(normName, 255, bf16NaN)) },
			nil, []string{weights, `tensor "` + normName + `" has a non-finite value (NaN) at flat index 255`}},
		{"NaN in lm_head", func(t *testing.T, dir string) { editStored(t, dir, setBF16(headName, 3, bf16NaN)) },
			nil, []string{weights, `tensor "` + headName + `" has a non-finite value (NaN) at flat index 3`}},

		// config.json against the weights.
		{"more heads than stored", func(t *testing.T, dir string) { setConfig(t, dir, "num_attention_heads", 16) },
			nil, []string{weights, `tensor "model.layers.0.self_attn.q_proj.weight" has shape [256 256], config.json implies [512 256]`}},
		{"more KV heads than stored", func(t *testing.T, dir string) { setConfig(t, dir, "num_key_value_heads", 4) },
			nil, []string{weights, `tensor "model.layers.0.self_attn.k_proj.weight" has shape [64 256], config.json implies [128 256]`}},
		{"wider hidden size", func(t *testing.T, dir string) { setConfig(t, dir, "hidden_size", 512) },
			nil, []string{weights, `tensor "` + embedName + `" has shape [257 256], config.json implies [257 512]`}},
		{"wider MLP", func(t *testing.T, dir string) { setConfig(t, dir, "intermediate_size", 1024) },
			nil, []string{weights, `tensor "model.layers.0.mlp.gate_proj.weight" has shape [688 256], config.json implies [1024 256]`}},
		{"more layers than stored", func(t *testing.T, dir string) { setConfig(t, dir, "num_hidden_layers", 5) },
			nil, []string{weights, `tensor "model.layers.4.input_layernorm.weight" is missing (config.json implies it exists)`}},
		{"fewer layers than stored", func(t *testing.T, dir string) { setConfig(t, dir, "num_hidden_layers", 3) },
			nil, []string{weights, `tensor "model.layers.3.input_layernorm.weight" belongs to a layer beyond config.json's num_hidden_layers 3`}},
		{"KV heads not dividing heads", func(t *testing.T, dir string) { setConfig(t, dir, "num_key_value_heads", 3) },
			nil, []string{"DIR" + string(filepath.Separator) + "config.json", "num_attention_heads 8 is not a multiple of num_key_value_heads 3"}},
		{"config.json truncated", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "config.json"), func(b []byte) []byte { return b[:len(b)/2] })
		}, nil, []string{"DIR" + string(filepath.Separator) + "config.json", "invalid JSON", "unexpected EOF"}},
		{"config.json with a string size", func(t *testing.T, dir string) { setConfig(t, dir, "hidden_size", "256") },
			nil, []string{"DIR" + string(filepath.Separator) + "config.json", `key "hidden_size": want a number, got a JSON string`}},
		{"config.json missing", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, "config.json")) },
			nil, []string{"DIR" + string(filepath.Separator) + "config.json", "no such file or directory"}},
		{"config.json is a FIFO", func(t *testing.T, dir string) {
			p := filepath.Join(dir, "config.json")
			os.Remove(p)
			desttest.Mkfifo(t, p)
		}, nil, []string{"DIR" + string(filepath.Separator) + "config.json is not a regular file"}},
		{"config.json of 32 MiB", func(t *testing.T, dir string) {
			if err := os.Truncate(filepath.Join(dir, "config.json"), 32<<20); err != nil {
				t.Fatal(err)
			}
		}, nil, []string{"DIR" + string(filepath.Separator) + "config.json is 33554432 bytes, over the 16777216-byte limit for a config"}},

		// A tokenizer.json of a model type the tokenizer does not know.
		{"unknown tokenizer model: calibrated convert", breakTokenizer,
			[]string{"convert", "DIR", "--dc", "32", "--calib", calib, "--calib-tokens", "256", "--calib-seq", "64"},
			[]string{"DIR" + string(filepath.Separator) + "tokenizer.json", `unsupported model type "WordLevel" (supported: BPE)`}},
		{"unknown tokenizer model: eval", breakTokenizer,
			[]string{"eval", "DIR", "--data", calib, "--ctx", "64"},
			[]string{"DIR" + string(filepath.Separator) + "tokenizer.json", `unsupported model type "WordLevel" (supported: BPE)`}},
		{"unknown tokenizer model: tokenize", breakTokenizer,
			[]string{"tokenize", "DIR", "--data", calib},
			[]string{"DIR" + string(filepath.Separator) + "tokenizer.json", `unsupported model type "WordLevel" (supported: BPE)`}},
		{"tokenizer.json is a FIFO", func(t *testing.T, dir string) {
			p := filepath.Join(dir, "tokenizer.json")
			os.Remove(p)
			desttest.Mkfifo(t, p)
		}, []string{"eval", "DIR", "--data", calib, "--ctx", "64"},
			[]string{"DIR" + string(filepath.Separator) + "tokenizer.json is not a regular file"}},
		{"tokenizer.json is a FIFO: data-free convert", func(t *testing.T, dir string) {
			p := filepath.Join(dir, "tokenizer.json")
			os.Remove(p)
			desttest.Mkfifo(t, p)
		}, nil, []string{"copy tokenizer.json: DIR" + string(filepath.Separator) + "tokenizer.json is not a regular file"}},
		{"tokenizer.json truncated", func(t *testing.T, dir string) {
			editFile(t, filepath.Join(dir, "tokenizer.json"), func(b []byte) []byte { return b[:len(b)/2] })
		}, []string{"eval", "DIR", "--data", calib, "--ctx", "64"},
			[]string{"DIR" + string(filepath.Separator) + "tokenizer.json", "decode JSON: unexpected end of JSON input"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyDir(t, base)
			tc.mutate(t, dir)
			args := tc.args
			if args == nil {
				args = convertArgs
			}
			args = replaceAll(args, "DIR", dir)
			if args[0] != "convert" {
				checkHostileRun(t, args, tc.want, dir)
				return
			}
			// Once creating the output, once replacing a previous one.
			parent := t.TempDir()
			out := filepath.Join(parent, "out")
			checkHostileRun(t, append(args, "-o", out), tc.want, dir)
			if _, err := os.Stat(out); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s was written", out)
			}
			if entries, _ := os.ReadDir(parent); len(entries) != 0 {
				t.Errorf("left behind in the output's directory: %v", entries)
			}
			if err := os.CopyFS(out, os.DirFS(previous)); err != nil {
				t.Fatal(err)
			}
			checkHostileRun(t, append(args, "-o", out, "--force"), tc.want, dir)
			if dirDigest(t, out) != dirDigest(t, previous) {
				t.Errorf("the previous output %s changed", out)
			}
			if entries, _ := os.ReadDir(parent); len(entries) != 1 {
				t.Errorf("left behind in the output's directory: %v", entries)
			}
		})
	}
}

// checkHostileRun runs the CLI with args and fails t unless it exits with
// exitError and one error line holding each of want, where DIR stands for
// dir.
func checkHostileRun(t *testing.T, args, want []string, dir string) {
	t.Helper()
	_, stderr, code := run(t, args...)
	line := strings.TrimSpace(stderr)
	t.Logf("exit %d: %s", code, line)
	if code != exitError {
		t.Errorf("exit code %d, want %d", code, exitError)
	}
	if strings.Contains(line, "\n") || !strings.HasPrefix(line, "transmla: ") {
		t.Errorf("stderr is not one line starting with \"transmla: \": %q", stderr)
	}
	for _, w := range want {
		if w = strings.ReplaceAll(w, "DIR", dir); !strings.Contains(line, w) {
			t.Errorf("error lacks %q", w)
		}
	}
}

// dirDigest summarizes the files of dir (name and SHA-256 of the content,
// sorted), or returns "" if dir does not exist.
func dirDigest(t *testing.T, dir string) string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s %x\n", e.Name(), sha256.Sum256(data))
	}
	return b.String()
}

// breakTokenizer replaces tokenizer.json's model by one of an unsupported type.
func breakTokenizer(t *testing.T, dir string) {
	writeFile(t, filepath.Join(dir, "tokenizer.json"),
		[]byte(`{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}`))
}

// flipAfter xors the byte at offset off after the first occurrence of
// marker in b with mask.
func flipAfter(t *testing.T, b []byte, marker string, off int, mask byte) []byte {
	t.Helper()
	i := strings.Index(string(b), marker)
	if i < 0 {
		t.Fatalf("marker %q not in the file", marker)
	}
	b[i+len(marker)+off] ^= mask
	return b
}

func replaceAll(args []string, old, new string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = strings.ReplaceAll(a, old, new)
	}
	return out
}
