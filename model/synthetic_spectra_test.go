package model

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"gonum.org/v1/gonum/mat"
)

// spectraSpec is SyntheticLlama8B's recipe at a size a test can afford.
func spectraSpec() SyntheticSpec {
	s := SyntheticLlama8B(2)
	s.Hidden, s.Heads, s.KVHeads, s.HeadDim, s.Intermediate, s.Vocab = 256, 8, 2, 32, 96, 300
	return s
}

// topEnergy is the share of w's squared singular values in its top quarter.
func topEnergy(t *testing.T, w []float32, rows, cols int) float64 {
	t.Helper()
	m := mat.NewDense(rows, cols, nil)
	for i, v := range w {
		m.RawMatrix().Data[i] = float64(v)
	}
	var s mat.SVD
	if !s.Factorize(m, mat.SVDNone) {
		t.Fatal("svd failed")
	}
	var top, all float64
	for i, v := range s.Values(nil) {
		all += v * v
		if i < min(rows, cols)/4 {
			top += v * v
		}
	}
	return top / all
}

// Spectra checkpoints load, are the same bytes on every run, and have the
// intended profile: keys concentrate their energy (a quarter of the
// directions carries most of it) more than values, and more than the
// MLP's row-decayed Gaussian weights.
func TestSpectraSynthetic(t *testing.T) {
	spec := spectraSpec()
	a, b := writeSmall(t, spec), writeSmall(t, spec)
	for _, f := range []string{"config.json", "model.safetensors"} {
		x, err := os.ReadFile(filepath.Join(a, f))
		if err != nil {
			t.Fatal(err)
		}
		y, err := os.ReadFile(filepath.Join(b, f))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(x, y) {
			t.Errorf("%s differs between two runs", f)
		}
	}
	m, err := Load(context.Background(), a, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.Config.Rope.Theta != 500000 || m.Config.NumLayers != 2 {
		t.Errorf("config: rope theta %v, %d layers", m.Config.Rope.Theta, m.Config.NumLayers)
	}
	l := m.Layers[1]
	D, kv := spec.Hidden, spec.KVHeads*spec.HeadDim
	key, value, gate := topEnergy(t, l.K.W, kv, D), topEnergy(t, l.V.W, kv, D), topEnergy(t, l.Gate.W, spec.Intermediate, D)
	t.Logf("energy in the top quarter of singular values: k_proj %.2f, v_proj %.2f, gate_proj %.2f", key, value, gate)
	if key < 0.75 || value >= key || gate >= key {
		t.Errorf("top-quarter energies k %.2f (want ≥ 0.75), v %.2f and gate %.2f (want below k)", key, value, gate)
	}
}
