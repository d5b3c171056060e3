//go:build unix

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/transmla/transmla/model"
)

// buildCLI builds the transmla binary into a temporary directory, for
// tests that need a real child process to signal or measure.
func buildCLI(t *testing.T) string {
	t.Helper()
	gotool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go tool is needed to build the CLI: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "transmla")
	if out, err := exec.Command(gotool, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestInterruptedConvert signals a real convert process at random moments
// (SIGINT, then SIGKILL, alternately) while it replaces a previous output
// or creates a new one. Afterwards the output must be absent, the previous
// complete output byte for byte, or (if the run finished first) the new
// complete one. After SIGINT or a finished run nothing else may be left
// beside it; after SIGKILL only .out.partial-* directories, which the test
// removes as a user would. Set TRANSMLA_INTERRUPT_SEED to replay a seed.
func TestInterruptedConvert(t *testing.T) {
	bin := buildCLI(t)
	src := filepath.Join(t.TempDir(), "src")
	// Big enough that a conversion takes a noticeable time (0.3 to 1 s on
	// 2 cores), so that the signals land in every stage of it.
	if _, stderr, code := run(t, "synth", "-o", src, "--layers", "16", "--intermediate", "1376"); code != 0 {
		t.Fatalf("synth: %s", stderr)
	}
	// Two complete outputs that differ, A (d_c 32) and B (d_c 48).
	refs := t.TempDir()
	dcs := map[string]string{"A": "32", "B": "48"}
	want := map[string]string{"absent": ""} // digests
	var full time.Duration
	for name, dc := range dcs {
		start := time.Now()
		if out, err := exec.Command(bin, "convert", src, "--dc", dc, "-o", filepath.Join(refs, name)).CombinedOutput(); err != nil {
			t.Fatalf("reference conversion %s: %v\n%s", name, err, out)
		}
		full = max(full, time.Since(start))
		want[name] = dirDigest(t, filepath.Join(refs, name))
	}
	t.Logf("an uninterrupted conversion takes %v", full)

	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("TRANSMLA_INTERRUPT_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("TRANSMLA_INTERRUPT_SEED: %v", err)
		}
	}
	rng := rand.New(rand.NewPCG(seed, 0))
	t.Logf("seed %d (TRANSMLA_INTERRUPT_SEED=%d replays the same delays)", seed, seed)

	parent := t.TempDir()
	out := filepath.Join(parent, "out")
	const trials = 18
	outcomes := map[string]int{}
	for i := range trials {
		// Every pairing of signal and previous output, in turn.
		sig := []syscall.Signal{syscall.SIGINT, syscall.SIGKILL}[i%2]
		state := []string{"absent", "A", "B"}[(i/2)%3]
		if err := os.RemoveAll(out); err != nil {
			t.Fatal(err)
		}
		if state != "absent" {
			if err := os.CopyFS(out, os.DirFS(filepath.Join(refs, state))); err != nil {
				t.Fatal(err)
			}
		}
		target := "A"
		if state == "A" {
			target = "B"
		}
		delay := time.Duration(rng.Float64() * float64(full))
		cmd := exec.Command(bin, "convert", src, "--dc", dcs[target], "-o", out, "--force")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
			t.Fatal(err)
		}
		cmd.Wait()
		ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
		how := fmt.Sprintf("exit %d", ws.ExitStatus())
		if ws.Signaled() {
			how = "killed by " + signalName(ws.Signal())
		}
		desc := fmt.Sprintf("trial %d (seed %d): %s after %v, %s → %s: %s", i, seed, signalName(sig), delay.Round(time.Millisecond), state, target, how)
		outcomes[how]++

		var allowed []string // what out may hold
		leftovers := false
		switch {
		case !ws.Signaled() && ws.ExitStatus() == 0:
			allowed = []string{target}
		case !ws.Signaled() && ws.ExitStatus() == exitInterrupted:
			allowed = []string{state}
			if line := strings.TrimSpace(stderr.String()); strings.Contains(line, "\n") || !strings.Contains(line, "interrupted; "+out+" is left as it was") {
				t.Errorf("%s: stderr %q, want one line saying the output is left as it was", desc, line)
			}
		case ws.Signaled() && ws.Signal() == sig:
			// SIGKILL, or SIGINT before the handler was installed.
			allowed, leftovers = []string{state, target}, true
		default:
			t.Fatalf("%s: unexpected end; stderr: %s", desc, stderr.String())
		}
		// The previous state must be intact byte for byte; a new output
		// must be complete (conversion is not required to be
		// bit-reproducible, so it is checked by loading it).
		now := state
		if dirDigest(t, out) != want[state] {
			if err := checkComplete(out, filepath.Join(refs, target), dcs[target]); err != nil {
				t.Fatalf("%s: the output is neither the previous one (%s) byte for byte nor a complete new one: %v", desc, state, err)
			}
			now = target
		}
		if !slices.Contains(allowed, now) {
			t.Fatalf("%s: the output is %s, want one of %q", desc, now, allowed)
		}
		entries, err := os.ReadDir(parent)
		if err != nil {
			t.Fatal(err)
		}
		removed := 0
		for _, e := range entries {
			switch {
			case e.Name() == "out":
			case leftovers && strings.HasPrefix(e.Name(), ".out.partial-"):
				if err := os.RemoveAll(filepath.Join(parent, e.Name())); err != nil {
					t.Fatal(err)
				}
				removed++
			default:
				t.Errorf("%s: left behind %s", desc, e.Name())
			}
		}
		t.Logf("%s; output %s, %d temporary directories left", desc, now, removed)
	}
	t.Logf("outcomes: %v", outcomes)
}

// checkComplete reports why dir is not a complete conversion with latent
// width dc holding the same files as the reference conversion ref.
func checkComplete(dir, ref, dc string) error {
	names := func(d string) ([]string, error) {
		entries, err := os.ReadDir(d)
		var out []string
		for _, e := range entries {
			out = append(out, e.Name())
		}
		return out, err
	}
	got, err := names(dir)
	if err != nil {
		return err
	}
	want, err := names(ref)
	if err != nil {
		return err
	}
	if !slices.Equal(got, want) {
		return fmt.Errorf("files %v, want %v", got, want)
	}
	m, err := model.Load(context.Background(), dir, nil)
	if err != nil {
		return err
	}
	if got := strconv.Itoa(m.Config.MLA.KVLoraRank); got != dc {
		return fmt.Errorf("kv_lora_rank %s, want %s", got, dc)
	}
	return nil
}

func signalName(s syscall.Signal) string {
	switch s {
	case syscall.SIGINT:
		return "SIGINT"
	case syscall.SIGKILL:
		return "SIGKILL"
	}
	return s.String()
}
