//go:build unix

package sweep

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// The results directory and the files in it are written through symbolic
// links (the links kept), never replace a link by a directory, and an
// output that is a file or a pipe is refused before anything is written.
func TestSweepOutputDestinations(t *testing.T) {
	isLink := func(t *testing.T, link, want string) {
		t.Helper()
		if got, err := os.Readlink(link); err != nil || got != want {
			t.Errorf("%s links to %q (%v), want the link to %q kept", link, got, err, want)
		}
	}
	hasResults := func(t *testing.T, dir string) {
		t.Helper()
		for _, name := range []string{resultsJSON, resultsMD, filepath.Join("points", "original.json")} {
			if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || !fi.Mode().IsRegular() {
				t.Errorf("%s: %v, want the sweep's file", filepath.Join(dir, name), err)
			}
		}
	}
	for _, tc := range []struct {
		name string
		// setup prepares the output in base and other and returns -o
		// and a check of the outcome.
		setup   func(t *testing.T, base, other string) (dir string, check func(t *testing.T))
		wantErr string
		// short calibrates on too short a file, failing after the
		// output was created.
		short bool
	}{
		{"symlink to a directory", func(t *testing.T, base, other string) (string, func(*testing.T)) {
			link := filepath.Join(base, "out")
			os.Symlink(other, link)
			return link, func(t *testing.T) { isLink(t, link, other); hasResults(t, other) }
		}, "", false},
		{"dangling symlink", func(t *testing.T, base, other string) (string, func(*testing.T)) {
			link, target := filepath.Join(base, "out"), filepath.Join(other, "new")
			os.Symlink(target, link)
			return link, func(t *testing.T) { isLink(t, link, target); hasResults(t, target) }
		}, "", false},
		{"dangling symlink, failed sweep", func(t *testing.T, base, other string) (string, func(*testing.T)) {
			link, target := filepath.Join(base, "out"), filepath.Join(other, "new")
			os.Symlink(target, link)
			return link, func(t *testing.T) {
				isLink(t, link, target)
				if _, err := os.Lstat(target); err == nil {
					t.Errorf("the failed sweep left %s behind", target)
				}
			}
		}, "calib", true},
		{"a results file that is a symlink", func(t *testing.T, base, other string) (string, func(*testing.T)) {
			dir := filepath.Join(base, "out")
			os.Mkdir(dir, 0o755)
			link, target := filepath.Join(dir, resultsMD), filepath.Join(other, "table.md")
			os.Symlink(target, link)
			return dir, func(t *testing.T) {
				isLink(t, link, target)
				if b, err := os.ReadFile(target); err != nil || !strings.Contains(string(b), "original") {
					t.Errorf("%s holds %q (%v), want the results table", target, b, err)
				}
			}
		}, "", false},
		{"a regular file", func(t *testing.T, base, _ string) (string, func(*testing.T)) {
			p := filepath.Join(base, "out")
			os.WriteFile(p, []byte("mine"), 0o644)
			return p, func(t *testing.T) {
				if b, err := os.ReadFile(p); err != nil || string(b) != "mine" {
					t.Errorf("%s holds %q (%v), want it unchanged", p, b, err)
				}
			}
		}, "is a regular file, not a directory", false},
		{"a FIFO", func(t *testing.T, base, _ string) (string, func(*testing.T)) {
			p := filepath.Join(base, "out")
			if err := syscall.Mkfifo(p, 0o644); err != nil {
				t.Fatal(err)
			}
			return p, func(t *testing.T) {
				if fi, err := os.Lstat(p); err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
					t.Errorf("%s is no longer a FIFO (%v)", p, err)
				}
			}
		}, "is a named pipe, not a directory", false},
		{"a point that is a FIFO", func(t *testing.T, base, _ string) (string, func(*testing.T)) {
			dir := filepath.Join(base, "out")
			os.MkdirAll(filepath.Join(dir, "points"), 0o755)
			if err := syscall.Mkfifo(filepath.Join(dir, "points", "x-dc8.json"), 0o644); err != nil {
				t.Fatal(err)
			}
			return dir, func(*testing.T) {}
		}, "x-dc8.json is not a regular file", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var evals []string
			c := syntheticConfig(t, []int{8}, &evals)
			c.Methods = c.Methods[:1]
			if tc.short {
				short := filepath.Join(t.TempDir(), "short.txt")
				os.WriteFile(short, []byte("far too short to calibrate on"), 0o644)
				c.Calibration.File = short
			}
			var check func(*testing.T)
			c.Dir, check = tc.setup(t, t.TempDir(), t.TempDir())
			_, err := Run(context.Background(), c)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatal(err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("error %v, want one saying %q", err, tc.wantErr)
			}
			check(t)
		})
	}
}
