// Package interoptest runs the Python interop harness (scripts/interop/,
// Hugging Face transformers) for tests that check this project against it.
//
// The harness is found through TRANSMLA_INTEROP_PYTHON, the python of the
// venv that scripts/interop/setup.sh makes (.ci/run sets it). Without it the
// tests skip with a message, unless TRANSMLA_REQUIRE_INTEROP=1 (CI), where a
// missing harness fails them.
package interoptest

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// Python returns the harness's python, or skips (fails where required) t.
func Python(t testing.TB) string {
	t.Helper()
	py := os.Getenv("TRANSMLA_INTEROP_PYTHON")
	if py == "" {
		missing(t, "TRANSMLA_INTEROP_PYTHON is not set (scripts/interop/setup.sh prints the python to set it to)")
	}
	if _, err := os.Stat(py); err != nil {
		missing(t, "TRANSMLA_INTEROP_PYTHON: "+err.Error())
	}
	return py
}

func missing(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("TRANSMLA_REQUIRE_INTEROP") == "1" {
		t.Fatalf("interop harness required (TRANSMLA_REQUIRE_INTEROP=1) but unusable: %s", why)
	}
	t.Skipf("interop harness absent: %s", why)
}

// Script is the path of scripts/interop/NAME in this repository.
func Script(t testing.TB, name string) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("interoptest: cannot locate the repository")
	}
	// this file is <repo>/internal/interoptest/interoptest.go
	return filepath.Join(filepath.Dir(file), "..", "..", "scripts", "interop", name)
}

// HF runs scripts/interop/hf.py with args and decodes its JSON output
// into out; a failure of the script fails t with its stderr.
func HF(t testing.TB, out any, args ...string) {
	t.Helper()
	py := Python(t)
	cmd := exec.Command(py, append([]string{Script(t, "hf.py")}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("hf.py %v: %v\n%s", args, err, stderr.Bytes())
	}
	if err := json.Unmarshal(stdout.Bytes(), out); err != nil {
		t.Fatalf("hf.py %v: output %q: %v", args, stdout.Bytes(), err)
	}
}

// ReadLogits reads the logits file that hf.py fixture and hf.py logits
// write: float32 values, little-endian, row-major.
func ReadLogits(t testing.TB, path string) []float32 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}
