package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/internal/sharedtest"
)

// run executes the CLI in-process and returns its output and exit code.
func run(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	ctx := context.Background()
	app := newApp(&out, &errb)
	err := app.RunContext(ctx, flagsFirst(app, append([]string{"transmla"}, args...)))
	code = exitCode(ctx, err, &errb)
	return out.String(), errb.String(), code
}

// synthetic writes the default synthetic checkpoint once per test.
func synthetic(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "synth")
	if _, stderr, code := run(t, "synth", "-o", dir); code != 0 {
		t.Fatalf("synth failed (%d): %s", code, stderr)
	}
	return dir
}

func TestDemo(t *testing.T) {
	out, stderr, code := run(t, "demo")
	if code != 0 {
		t.Fatalf("demo exit %d: %s", code, stderr)
	}
	for _, want := range []string{"synthetic GQA checkpoint written", "transmla convert", "KV cache values/token", " 512 ", " 256\n", "cache reduction", "50.0%", "greedy ids after:  ["} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}

func TestInspectAndEvalJSON(t *testing.T) {
	dir := synthetic(t)
	out, stderr, code := run(t, "inspect", dir, "--json")
	if code != 0 {
		t.Fatalf("inspect exit %d: %s", code, stderr)
	}
	var rep inspectReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	// The default synthetic shape: D 256, 8 heads × 32, 2 KV heads, MLP 688, vocab 257, 4 layers, untied.
	const D, q, kv, I, V, L = 256, 8 * 32, 2 * 32, 688, 257, 4
	perLayer := 2*D + q*D + 2*kv*D + D*q + 3*D*I
	if want := int64(2*V*D + D + L*perLayer); rep.Parameters != want {
		t.Errorf("parameters %d, want %d", rep.Parameters, want)
	}
	if rep.KVCacheBytesPerToken != 2*kv*L*2 || rep.DType != "BF16" || len(rep.Attention) != L {
		t.Errorf("inspect report %+v", rep)
	}

	data := filepath.Join(t.TempDir(), "text.txt")
	if err := os.WriteFile(data, []byte(strings.Repeat(demoText, 2)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, stderr, code = run(t, "eval", dir, "--data", data, "--ctx", "64", "--max-windows", "3", "--json")
	if code != 0 {
		t.Fatalf("eval exit %d: %s", code, stderr)
	}
	var ev map[string]any
	if err := json.Unmarshal([]byte(out), &ev); err != nil {
		t.Fatal(err)
	}
	if ev["windows"] != 3.0 || ev["tokens_scored"] != 3.0*63 || ev["kv_cache_bytes_per_token"] != float64(2*kv*L*2) || ev["kv_cache_bytes_at_ctx"] != float64(2*kv*L*2*64) {
		t.Errorf("eval report %v", ev)
	}
	if ppl, ok := ev["ppl"].(float64); !ok || !(ppl > 1) {
		t.Errorf("ppl %v", ev["ppl"])
	}
	if tps, ok := ev["tokens_per_second"].(float64); !ok || !(tps > 0) {
		t.Errorf("tokens_per_second %v", ev["tokens_per_second"])
	}
}

func TestSynthIsDeterministic(t *testing.T) {
	a, b := synthetic(t), synthetic(t)
	for _, f := range []string{"config.json", "model.safetensors", "tokenizer.json"} {
		x, err := os.ReadFile(filepath.Join(a, f))
		if err != nil {
			t.Fatal(err)
		}
		y, err := os.ReadFile(filepath.Join(b, f))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(x, y) {
			t.Errorf("%s differs between two runs of synth", f)
		}
	}
}

func TestErrorsAndExitCodes(t *testing.T) {
	dir := synthetic(t)
	badArch := t.TempDir()
	if err := os.WriteFile(filepath.Join(badArch, "config.json"), []byte(`{"architectures": ["GPT2LMHeadModel"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(t.TempDir(), "data.txt")
	if err := os.WriteFile(data, []byte(demoText), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no model argument", []string{"eval", "--data", "x"}, exitUsage, "exactly one MODEL"},
		{"unknown flag", []string{"inspect", "--nope", dir}, exitUsage, "flag provided but not defined"},
		{"missing --data", []string{"eval", dir}, exitUsage, "--data is required"},
		{"ctx too small", []string{"eval", dir, "--data", "x", "--ctx", "1"}, exitUsage, "--ctx must be at least 2"},
		{"missing model", []string{"inspect", filepath.Join(dir, "absent")}, exitError, "absent"},
		{"missing data", []string{"eval", dir, "--data", filepath.Join(dir, "absent.txt")}, exitError, "read --data"},
		{"unsupported architecture", []string{"inspect", badArch}, exitError, `unsupported architecture "GPT2LMHeadModel" (supported: DeepseekV3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)`},
		{"synth refuses to overwrite", []string{"synth", "-o", dir}, exitUsage, "exists; pass --force"},
		{"ctx beyond the trained context", []string{"eval", dir, "--data", filepath.Join(dir, "config.json"), "--ctx", "4096"}, exitUsage, "exceeds the model's max_position_embeddings 2048"},
		{"data shorter than a window", []string{"eval", dir, "--data", filepath.Join(dir, "config.json"), "--ctx", "2000"}, exitError, "fewer than one window of --ctx 2000"},
		{"max-tokens beyond the context", []string{"generate", dir, "--prompt", "hi", "--max-tokens", "9223372036854775807"}, exitUsage, "exceeds the model's 2048 positions"},
		{"demo ctx out of range", []string{"demo", "--ctx", "1"}, exitUsage, "--ctx must be in [2,"},
		{"demo keeps an existing dir", []string{"demo", "--dir", dir}, exitUsage, "exists; pass --force"},
		{"bad threads", []string{"--threads", "0", "inspect", dir}, exitUsage, "--threads must be positive"},
		{"unknown backend, command that computes nothing", []string{"--blas", "fast", "inspect", dir}, exitUsage, `--blas: unknown backend "fast"`},
		{"unknown command", []string{"evaluate", dir}, exitUsage, `unknown command "evaluate"`},
		// Bad flag values are reported before the model is read, so a
		// missing model does not mask them.
		{"eval: unknown MLA path", []string{"eval", filepath.Join(dir, "absent"), "--data", "x", "--mla-path", "fast"}, exitUsage, `"fast"`},
		{"eval: unknown cache dtype", []string{"eval", filepath.Join(dir, "absent"), "--data", "x", "--cache-dtype", "f8"}, exitUsage, `"f8"`},
		{"generate: unknown cache dtype", []string{"generate", filepath.Join(dir, "absent"), "--cache-dtype", "f8"}, exitUsage, `"f8"`},
		{"bench: unknown cache dtype", []string{"bench", filepath.Join(dir, "absent"), "--cache-dtype", "f8"}, exitUsage, `"f8"`},
		{"help on an unknown command", []string{"help", "evaluate"}, exitUsage, "evaluate"},
		// --ids-out never replaces an input.
		{"tokenize: ids over the data", []string{"tokenize", dir, "--data", data, "--ids-out", data}, exitUsage, "is the --data file"},
		{"tokenize: ids into the model", []string{"tokenize", dir, "--data", data, "--ids-out", filepath.Join(dir, "config.json")}, exitUsage, "lies inside the model"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, code := run(t, tc.args...)
			if code != tc.code || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", code, stderr, tc.code, tc.want)
			}
			if strings.Count(strings.TrimSpace(stderr), "\n") > 0 && !strings.Contains(stderr, "Incorrect Usage") {
				t.Errorf("error is not one line: %q", stderr)
			}
		})
	}
	if b, err := os.ReadFile(data); err != nil || string(b) != demoText {
		t.Errorf("the data file changed (%v)", err)
	}
}

func TestGenerateStories260KIDs(t *testing.T) {
	dir := sharedtest.Path(t, "models/stories260K")
	out, stderr, code := run(t, "generate", dir, "--max-tokens", "256", "--ids")
	if code != 0 {
		t.Fatalf("generate exit %d: %s", code, stderr)
	}
	var got, want []int
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "expected_greedy_ids.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &want); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want[1:]) {
		t.Fatalf("generate --ids gave %v,\nwant (after BOS) %v", got, want[1:])
	}
	text, stderr, code := run(t, "generate", dir, "--max-tokens", "256")
	if code != 0 {
		t.Fatalf("generate exit %d: %s", code, stderr)
	}
	expected, err := os.ReadFile(filepath.Join(dir, "EXPECTED_GREEDY.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if text != string(expected) {
		t.Errorf("generate text:\n%q\nwant EXPECTED_GREEDY.txt:\n%q", text, expected)
	}
}
