//go:build unix

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/transmla/transmla/safetensors"
)

// llama8BShape is Llama-3-8B's layer shape with a small vocabulary (256
// instead of 128256), which keeps the checkpoint to its layers.
var llama8BShape = struct{ hidden, heads, kvHeads, headDim, mlp, vocab int }{4096, 32, 8, 128, 14336, 256}

// writeLlama8BShaped writes a bf16 Llama checkpoint of llama8BShape with
// the given number of layers into dir, generating each tensor while it is
// written so that the test itself holds no layer in memory.
func writeLlama8BShaped(t *testing.T, dir string, layers int) {
	t.Helper()
	s := llama8BShape
	cfg, err := json.Marshal(map[string]any{
		"architectures": []string{"LlamaForCausalLM"}, "hidden_size": s.hidden, "intermediate_size": s.mlp,
		"num_hidden_layers": layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kvHeads,
		"head_dim": s.headDim, "vocab_size": s.vocab, "max_position_embeddings": 8192,
		"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false,
	})
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "config.json"), cfg)
	rng := rand.New(rand.NewPCG(8, 3))
	// random plans a tensor of Gaussian values of standard deviation std.
	random := func(name string, std float64, shape ...int) safetensors.TensorSpec {
		return safetensors.TensorSpec{Name: name, DType: safetensors.BF16, Shape: shape, Write: func(w io.Writer) error {
			n := 1
			for _, d := range shape {
				n *= d
			}
			buf := make([]float32, min(n, 1<<16))
			for done := 0; done < n; done += len(buf) {
				part := buf[:min(len(buf), n-done)]
				for i := range part {
					part[i] = float32(std * rng.NormFloat64())
				}
				if err := safetensors.Float32Tensor(name, safetensors.BF16, []int{len(part)}, part).Write(w); err != nil {
					return err
				}
			}
			return nil
		}}
	}
	D, q, kv := s.hidden, s.heads*s.headDim, s.kvHeads*s.headDim
	scale := func(in int) float64 { return 1 / math.Sqrt(float64(in)) }
	specs := []safetensors.TensorSpec{random("model.embed_tokens.weight", 1, s.vocab, D)}
	for i := range layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		specs = append(specs,
			random(p+"input_layernorm.weight", 0.1, D),
			random(p+"self_attn.q_proj.weight", scale(D), q, D),
			random(p+"self_attn.k_proj.weight", scale(D), kv, D),
			random(p+"self_attn.v_proj.weight", scale(D), kv, D),
			random(p+"self_attn.o_proj.weight", scale(q), D, q),
			random(p+"post_attention_layernorm.weight", 0.1, D),
			random(p+"mlp.gate_proj.weight", scale(D), s.mlp, D),
			random(p+"mlp.up_proj.weight", scale(D), s.mlp, D),
			random(p+"mlp.down_proj.weight", scale(s.mlp), D, s.mlp))
	}
	specs = append(specs, random("model.norm.weight", 0.1, D), random("lm_head.weight", scale(D), s.vocab, D))
	if err := safetensors.WriteCheckpoint(context.Background(), dir, specs, safetensors.WriteOptions{MaxShardBytes: 5 << 30}); err != nil {
		t.Fatal(err)
	}
}

// TestConvertMemoryIsBoundedByALayer converts Llama-3-8B-shaped
// checkpoints of 2 and 4 layers data-free in a child process and compares
// the peak RSS the CLI reports: streaming holds about one layer at a time,
// so two more layers may add well under one layer's float32 size.
func TestConvertMemoryIsBoundedByALayer(t *testing.T) {
	if testing.Short() {
		t.Skip("converts 6 layers of Llama-3-8B shape (minutes): skipped with -short")
	}
	bin := buildCLI(t)
	s := llama8BShape
	D, q, kv := s.hidden, s.heads*s.headDim, s.kvHeads*s.headDim
	layerF32 := int64(4 * (2*q*D + 2*kv*D + 3*s.mlp*D + 2*D))
	peak := map[int]int64{}
	for _, layers := range []int{2, 4} {
		dir := filepath.Join(t.TempDir(), "src")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		writeLlama8BShaped(t, dir, layers)
		out := filepath.Join(t.TempDir(), "out")
		cmd := exec.Command(bin, "convert", dir, "--dc", "512", "-o", out, "--json")
		cmd.Stderr = io.Discard
		stdout, err := cmd.Output()
		if err != nil {
			t.Fatalf("convert %d layers: %v", layers, err)
		}
		var rep convertReport
		if err := json.Unmarshal(stdout, &rep); err != nil {
			t.Fatalf("convert --json: %v\n%s", err, stdout)
		}
		if rep.PeakRSSBytes <= 0 {
			t.Fatalf("no peak RSS in %s", stdout)
		}
		peak[layers] = rep.PeakRSSBytes
		t.Logf("%d layers: peak RSS %s (%d bytes), conversion %.1f s", layers, humanBytes(rep.PeakRSSBytes), rep.PeakRSSBytes, rep.Seconds)
		// Free the disk before the next, larger checkpoint.
		os.RemoveAll(dir)
		os.RemoveAll(out)
	}
	growth := peak[4] - peak[2]
	t.Logf("one layer in float32: %s; peak RSS growth from 2 to 4 layers: %s (%.2f layers)",
		humanBytes(layerF32), humanBytes(growth), float64(growth)/float64(layerF32))
	if growth >= layerF32/2 {
		t.Errorf("peak RSS grows by %s from 2 to 4 layers, not well below one layer's %s", humanBytes(growth), humanBytes(layerF32))
	}
}
