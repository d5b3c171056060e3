package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/transmla/transmla/internal/desttest"
)

// TestTokenizeIDsOutDestinations writes --ids-out to a regular file, then
// through a link, to a named pipe, and, as in the original report
// (--ids-out /dev/stdout, run as root, replaced the /dev/stdout link with
// a file and printed nothing), through a link to /proc/self/fd/N of a
// pipe. Each gets the same bytes as the regular file, and the links and
// pipes stay what they were.
func TestTokenizeIDsOutDestinations(t *testing.T) {
	dir := synthetic(t)
	data := filepath.Join(t.TempDir(), "text.txt")
	if err := os.WriteFile(data, []byte(demoText), 0o644); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(t.TempDir(), "ids.json")
	stdout, stderr, code := run(t, "tokenize", dir, "--data", data, "--ids-out", plain)
	if code != 0 {
		t.Fatalf("tokenize exit %d: %s", code, stderr)
	}
	b, err := os.ReadFile(plain)
	if err != nil {
		t.Fatal(err)
	}
	want := string(b)
	var ids []int
	if err := json.Unmarshal(b, &ids); err != nil || !strings.HasSuffix(want, "]\n") || strings.Count(want, "\n") != 1 {
		t.Fatalf("--ids-out holds %q (%v), want a JSON array on one line", want, err)
	}
	if !strings.HasPrefix(stdout, fmt.Sprintf("%d tokens", len(ids))) {
		t.Errorf("tokenize printed %q for %d ids", stdout, len(ids))
	}

	for _, tc := range []struct {
		name string
		// setup returns --ids-out and, for a stream, what waits for
		// the bytes a reader received; check runs after.
		setup   func(t *testing.T, base, other string) (out string, received func() string, check func(t *testing.T))
		code    int
		wantErr string
	}{
		{"symlink to a file", func(t *testing.T, base, other string) (string, func() string, func(*testing.T)) {
			target, link := filepath.Join(other, "real.json"), filepath.Join(base, "ids.json")
			os.WriteFile(target, []byte("old"), 0o600)
			os.Symlink(target, link)
			return link, nil, func(t *testing.T) {
				desttest.KeptLink(t, link, target)
				if b, err := os.ReadFile(target); err != nil || string(b) != want {
					t.Errorf("the link's target holds %.40q… (%v), want the ids", b, err)
				}
			}
		}, exitOK, ""},
		{"dangling symlink", func(t *testing.T, base, other string) (string, func() string, func(*testing.T)) {
			target, link := filepath.Join(other, "new.json"), filepath.Join(base, "ids.json")
			os.Symlink(target, link)
			return link, nil, func(t *testing.T) {
				desttest.KeptLink(t, link, target)
				if b, err := os.ReadFile(target); err != nil || string(b) != want {
					t.Errorf("the link's new target holds %.40q… (%v), want the ids", b, err)
				}
			}
		}, exitOK, ""},
		{"FIFO", func(t *testing.T, base, _ string) (string, func() string, func(*testing.T)) {
			p := filepath.Join(base, "fifo")
			desttest.Mkfifo(t, p)
			return p, desttest.ReadFile(t, p), func(t *testing.T) { desttest.KeptFIFO(t, p) }
		}, exitOK, ""},
		{"symlink to a FIFO", func(t *testing.T, base, other string) (string, func() string, func(*testing.T)) {
			p, link := filepath.Join(other, "fifo"), filepath.Join(base, "stdout")
			desttest.Mkfifo(t, p)
			os.Symlink(p, link)
			return link, desttest.ReadFile(t, p), func(t *testing.T) {
				desttest.KeptLink(t, link, p)
				desttest.KeptFIFO(t, p)
			}
		}, exitOK, ""},
		{"symlink to /proc/self/fd/N of a pipe (the original report)", func(t *testing.T, base, _ string) (string, func() string, func(*testing.T)) {
			if runtime.GOOS != "linux" {
				t.Skip("/proc/self/fd is Linux's")
			}
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			fd, link := fmt.Sprintf("/proc/self/fd/%d", w.Fd()), filepath.Join(base, "stdout")
			os.Symlink(fd, link)
			received := desttest.ReadInBackground(t, func() (io.ReadCloser, error) { return r, nil })
			return link, func() string { w.Close(); return received() }, func(t *testing.T) { desttest.KeptLink(t, link, fd) }
		}, exitOK, ""},
		{"a directory in the way", func(t *testing.T, base, _ string) (string, func() string, func(*testing.T)) {
			p := filepath.Join(base, "ids.json")
			os.Mkdir(p, 0o755)
			return p, nil, func(t *testing.T) {
				if fi, err := os.Lstat(p); err != nil || !fi.IsDir() {
					t.Errorf("%s is no longer a directory (%v)", p, err)
				}
			}
		}, exitError, "it is a directory, which a file cannot replace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, received, check := tc.setup(t, t.TempDir(), t.TempDir())
			_, stderr, code := run(t, "tokenize", dir, "--data", data, "--ids-out", out)
			if code != tc.code || !strings.Contains(stderr, tc.wantErr) || (tc.wantErr != "" && !strings.Contains(stderr, out)) {
				t.Fatalf("exit %d, stderr %q; want %d and an error naming %s, saying %q", code, stderr, tc.code, out, tc.wantErr)
			}
			if received != nil {
				if got := received(); got != want {
					t.Errorf("the reader received %.60q…, want the ids (%d bytes)", got, len(want))
				}
			}
			check(t)
		})
	}
}

// TestOutputDirectoryDestinations runs synth and convert with -o a link to
// an existing output (kept, its target replaced only with --force), a
// dangling link (its target created), a regular file or a named pipe
// (refused, left as they were).
func TestOutputDirectoryDestinations(t *testing.T) {
	src := synthetic(t)
	commands := []struct {
		name string
		args func(out string) []string
		// arch is in the config.json it writes; exists is its exit code
		// for an existing output without --force.
		arch   string
		exists int
	}{
		{"synth", func(out string) []string { return []string{"synth", "-o", out} }, "LlamaForCausalLM", exitUsage},
		{"convert", func(out string) []string { return []string{"convert", src, "--dc", "32", "-o", out} }, "DeepseekV3ForCausalLM", exitError},
	}
	// existing makes a directory standing for a previous output.
	existing := func(t *testing.T, dir string) {
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "mine.txt"), []byte("mine"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, cmd := range commands {
		wrote := func(t *testing.T, dir string) {
			t.Helper()
			if b, err := os.ReadFile(filepath.Join(dir, "config.json")); err != nil || !strings.Contains(string(b), cmd.arch) {
				t.Errorf("%s/config.json: %v, want %s's output", dir, err, cmd.name)
			}
			if _, err := os.Stat(filepath.Join(dir, "mine.txt")); err == nil {
				t.Errorf("%s still holds the previous output's file", dir)
			}
		}
		untouched := func(t *testing.T, dir string) {
			t.Helper()
			if b, err := os.ReadFile(filepath.Join(dir, "mine.txt")); err != nil || string(b) != "mine" {
				t.Errorf("the previous output %s changed: %q (%v)", dir, b, err)
			}
		}
		for _, tc := range []struct {
			name  string
			force bool
			// setup returns -o and a check of the outcome.
			setup   func(t *testing.T, base, other string) (out string, check func(t *testing.T))
			code    int
			wantErr string
		}{
			{"symlink to an existing output", false, func(t *testing.T, base, other string) (string, func(*testing.T)) {
				target, link := filepath.Join(other, "real"), filepath.Join(base, "out")
				existing(t, target)
				os.Symlink(target, link)
				return link, func(t *testing.T) { desttest.KeptLink(t, link, target); untouched(t, target) }
			}, cmd.exists, "exists; pass --force to replace it"},
			{"symlink to an existing output", true, func(t *testing.T, base, other string) (string, func(*testing.T)) {
				target, link := filepath.Join(other, "real"), filepath.Join(base, "out")
				existing(t, target)
				os.Symlink(target, link)
				return link, func(t *testing.T) { desttest.KeptLink(t, link, target); wrote(t, target) }
			}, exitOK, ""},
			{"dangling symlink", false, func(t *testing.T, base, other string) (string, func(*testing.T)) {
				target, link := filepath.Join(other, "new"), filepath.Join(base, "out")
				os.Symlink(target, link)
				return link, func(t *testing.T) { desttest.KeptLink(t, link, target); wrote(t, target) }
			}, exitOK, ""},
			{"a regular file", true, func(t *testing.T, base, _ string) (string, func(*testing.T)) {
				p := filepath.Join(base, "out")
				os.WriteFile(p, []byte("mine"), 0o644)
				return p, func(t *testing.T) {
					if b, err := os.ReadFile(p); err != nil || string(b) != "mine" {
						t.Errorf("%s holds %q (%v), want it unchanged", p, b, err)
					}
				}
			}, exitError, "is a regular file, not a directory; remove it or name another output directory"},
			{"a named pipe", true, func(t *testing.T, base, _ string) (string, func(*testing.T)) {
				p := filepath.Join(base, "out")
				desttest.Mkfifo(t, p)
				return p, func(t *testing.T) { desttest.KeptFIFO(t, p) }
			}, exitError, "is a named pipe, not a directory"},
		} {
			name := cmd.name + ": " + tc.name
			if tc.force {
				name += ", --force"
			}
			t.Run(name, func(t *testing.T) {
				base, other := t.TempDir(), t.TempDir()
				out, check := tc.setup(t, base, other)
				args := cmd.args(out)
				if tc.force {
					args = append(args, "--force")
				}
				_, stderr, code := run(t, args...)
				if code != tc.code || !strings.Contains(stderr, tc.wantErr) || (tc.wantErr != "" && !strings.Contains(stderr, out)) {
					t.Fatalf("exit %d, stderr %q; want %d and an error naming %s, saying %q", code, stderr, tc.code, out, tc.wantErr)
				}
				check(t)
				for _, d := range []string{base, other} {
					es, _ := os.ReadDir(d)
					for _, e := range es {
						if strings.Contains(e.Name(), ".partial-") {
							t.Errorf("%s holds %s afterwards", d, e.Name())
						}
					}
				}
			})
		}
	}
}

// demo checks both of its directories before writing either.
func TestDemoChecksBothDirectoriesFirst(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "d")
	if err := os.WriteFile(dir+"-mla", []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, code := run(t, "demo", "--dir", dir, "--force")
	if code != exitError || !strings.Contains(stderr, dir+"-mla: it is a regular file, not a directory") {
		t.Errorf("exit %d, stderr %q; want %d and a refusal of %s-mla", code, stderr, exitError, dir)
	}
	if _, err := os.Lstat(dir); err == nil {
		t.Errorf("demo wrote %s before refusing %s-mla", dir, dir)
	}
}
