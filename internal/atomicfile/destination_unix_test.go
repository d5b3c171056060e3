//go:build unix

package atomicfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/transmla/transmla/internal/desttest"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// nullDevice returns a null device to write to: /dev/null itself where
// this process could not replace it anyway, and for root, who could, a
// node of the same device made in dir, so that a regression fails the
// test rather than the machine.
func nullDevice(t *testing.T, dir string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		return os.DevNull
	}
	fi, err := os.Stat(os.DevNull)
	if err != nil {
		t.Skipf("%s: %v", os.DevNull, err)
	}
	p := filepath.Join(dir, "null")
	if err := syscall.Mknod(p, syscall.S_IFCHR|0o666, int(fi.Sys().(*syscall.Stat_t).Rdev)); err != nil {
		t.Skipf("cannot make a null device: %v", err)
	}
	if f, err := os.OpenFile(p, os.O_WRONLY, 0); err != nil {
		t.Skipf("cannot open a device made in %s (nodev?): %v", dir, err)
	} else {
		f.Close()
	}
	return p
}

func hasContent(t *testing.T, path, want string) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil || !fi.Mode().IsRegular() {
		t.Errorf("%s is %v (%v), want a regular file", path, modeOf(fi), err)
		return
	}
	got, err := os.ReadFile(path)
	if err != nil || string(got) != want {
		t.Errorf("%s holds %q (%v), want %q", path, got, err, want)
	}
}

// TestWriteFileDestinations writes through each kind of destination: a
// regular file is replaced, a link written through (kept, its target
// replaced or created), a device or pipe written to, a directory refused.
// Each case checks what is at the destination afterwards and that no
// temporary file is left in the directories involved.
func TestWriteFileDestinations(t *testing.T) {
	const data = "[1,2,3]\n"
	for _, tc := range []struct {
		name string
		// setup makes the destination in dir (and other in another
		// directory) and returns the path to write and a check of the
		// result; wait, when set, is what a reader received.
		setup func(t *testing.T, dir, other string) (path string, check func(t *testing.T, wait func() string))
		// wantErr, when set, must appear in the error.
		wantErr string
	}{
		{"absent", func(t *testing.T, dir, _ string) (string, func(*testing.T, func() string)) {
			p := filepath.Join(dir, "out.json")
			return p, func(t *testing.T, _ func() string) { hasContent(t, p, data) }
		}, ""},
		{"regular file", func(t *testing.T, dir, _ string) (string, func(*testing.T, func() string)) {
			p := filepath.Join(dir, "out.json")
			writeFile(t, p, "old content, longer than the new")
			return p, func(t *testing.T, _ func() string) { hasContent(t, p, data) }
		}, ""},
		{"symlink to a regular file", func(t *testing.T, dir, other string) (string, func(*testing.T, func() string)) {
			target, link := filepath.Join(other, "real.json"), filepath.Join(dir, "out.json")
			writeFile(t, target, "old")
			symlink(t, target, link)
			return link, func(t *testing.T, _ func() string) {
				desttest.KeptLink(t, link, target)
				hasContent(t, target, data)
			}
		}, ""},
		{"relative symlink", func(t *testing.T, dir, other string) (string, func(*testing.T, func() string)) {
			link := filepath.Join(dir, "out.json")
			writeFile(t, filepath.Join(other, "real.json"), "old")
			rel := filepath.Join("..", filepath.Base(other), "real.json")
			symlink(t, rel, link)
			return link, func(t *testing.T, _ func() string) {
				desttest.KeptLink(t, link, rel)
				hasContent(t, filepath.Join(other, "real.json"), data)
			}
		}, ""},
		{"chain of symlinks", func(t *testing.T, dir, other string) (string, func(*testing.T, func() string)) {
			target, mid, link := filepath.Join(other, "real.json"), filepath.Join(other, "mid.json"), filepath.Join(dir, "out.json")
			writeFile(t, target, "old")
			symlink(t, "real.json", mid)
			symlink(t, mid, link)
			return link, func(t *testing.T, _ func() string) {
				desttest.KeptLink(t, link, mid)
				desttest.KeptLink(t, mid, "real.json")
				hasContent(t, target, data)
			}
		}, ""},
		{"dangling symlink", func(t *testing.T, dir, other string) (string, func(*testing.T, func() string)) {
			target, link := filepath.Join(other, "new.json"), filepath.Join(dir, "out.json")
			symlink(t, target, link)
			return link, func(t *testing.T, _ func() string) {
				desttest.KeptLink(t, link, target)
				hasContent(t, target, data)
			}
		}, ""},
		{"dangling chain through a directory link", func(t *testing.T, dir, other string) (string, func(*testing.T, func() string)) {
			// out.json → sub/new.json, where sub is a link to other.
			symlink(t, other, filepath.Join(dir, "sub"))
			link := filepath.Join(dir, "out.json")
			symlink(t, filepath.Join("sub", "new.json"), link)
			return link, func(t *testing.T, _ func() string) {
				desttest.KeptLink(t, link, filepath.Join("sub", "new.json"))
				desttest.KeptLink(t, filepath.Join(dir, "sub"), other)
				hasContent(t, filepath.Join(other, "new.json"), data)
			}
		}, ""},
		{"dangling symlink into a missing directory", func(t *testing.T, dir, other string) (string, func(*testing.T, func() string)) {
			link := filepath.Join(dir, "out.json")
			symlink(t, filepath.Join(other, "missing", "new.json"), link)
			return link, func(t *testing.T, _ func() string) {
				desttest.KeptLink(t, link, filepath.Join(other, "missing", "new.json"))
			}
		}, "cannot be reached"},
		{"symlink loop", func(t *testing.T, dir, _ string) (string, func(*testing.T, func() string)) {
			a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
			symlink(t, b, a)
			symlink(t, a, b)
			return a, func(t *testing.T, _ func() string) { desttest.KeptLink(t, a, b); desttest.KeptLink(t, b, a) }
		}, "a loop?"},
		{"FIFO", func(t *testing.T, dir, _ string) (string, func(*testing.T, func() string)) {
			p := filepath.Join(dir, "fifo")
			desttest.Mkfifo(t, p)
			return p, func(t *testing.T, wait func() string) {
				if got := wait(); got != data {
					t.Errorf("the reader received %q, want %q", got, data)
				}
				if fi, err := os.Lstat(p); err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
					t.Errorf("%s is %v (%v) after the write, want a FIFO still", p, modeOf(fi), err)
				}
			}
		}, ""},
		{"symlink to a FIFO", func(t *testing.T, dir, other string) (string, func(*testing.T, func() string)) {
			fifo, link := filepath.Join(other, "fifo"), filepath.Join(dir, "out.json")
			desttest.Mkfifo(t, fifo)
			symlink(t, fifo, link)
			return link, func(t *testing.T, wait func() string) {
				if got := wait(); got != data {
					t.Errorf("the reader received %q, want %q", got, data)
				}
				desttest.KeptLink(t, link, fifo)
				if fi, err := os.Lstat(fifo); err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
					t.Errorf("%s is %v (%v), want a FIFO still", fifo, modeOf(fi), err)
				}
			}
		}, ""},
		{"null device", func(t *testing.T, dir, _ string) (string, func(*testing.T, func() string)) {
			p := nullDevice(t, dir)
			return p, func(t *testing.T, _ func() string) {
				if fi, err := os.Lstat(p); err != nil || fi.Mode()&fs.ModeCharDevice == 0 {
					t.Errorf("%s is %v (%v), want a character device still", p, modeOf(fi), err)
				}
			}
		}, ""},
		{"a directory in the way", func(t *testing.T, dir, _ string) (string, func(*testing.T, func() string)) {
			p := filepath.Join(dir, "out.json")
			if err := os.Mkdir(p, 0o755); err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(p, "keep"), "mine")
			return p, func(t *testing.T, _ func() string) { hasContent(t, filepath.Join(p, "keep"), "mine") }
		}, "is a directory, which a file cannot replace"},
		{"symlink to a directory", func(t *testing.T, dir, other string) (string, func(*testing.T, func() string)) {
			link := filepath.Join(dir, "out.json")
			symlink(t, other, link)
			return link, func(t *testing.T, _ func() string) { desttest.KeptLink(t, link, other) }
		}, "symbolic link to "},
		{"socket", func(t *testing.T, dir, _ string) (string, func(*testing.T, func() string)) {
			p := filepath.Join(dir, "sock")
			l, err := net.Listen("unix", p)
			if err != nil {
				t.Skipf("unix socket: %v", err)
			}
			t.Cleanup(func() { l.Close() })
			return p, func(*testing.T, func() string) {}
		}, "a socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, other := t.TempDir(), t.TempDir()
			path, check := tc.setup(t, dir, other)
			wait := func() string { return "" }
			if fi, err := os.Stat(path); err == nil && fi.Mode()&fs.ModeNamedPipe != 0 {
				wait = desttest.ReadFile(t, path)
			}
			before := [][]string{desttest.DirNames(t, dir), desttest.DirNames(t, other)}
			err := WriteFile(path, []byte(data), 0o644)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("WriteFile: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), path)):
				t.Fatalf("WriteFile: %v, want an error naming %s and saying %q", err, path, tc.wantErr)
			}
			check(t, wait)
			// Only a created file may be new; no temporary file anywhere.
			for i, d := range []string{dir, other} {
				for _, name := range desttest.DirNames(t, d) {
					if strings.Contains(name, ".tmp") || (!slices.Contains(before[i], name) && err != nil) {
						t.Errorf("%s holds %s after the write", d, name)
					}
				}
			}
		})
	}
}

// The original report: /dev/stdout, a link to /proc/self/fd/1, which
// the kernel resolves to a pipe whose link text ("pipe:[…]") names no
// file. Writing to a link to /proc/self/fd/N of a pipe's write end must
// deliver the bytes to the pipe and leave the link alone.
func TestWriteFileThroughProcFDLinkToPipe(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("/proc/self/fd is Linux's")
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	fdPath := fmt.Sprintf("/proc/self/fd/%d", w.Fd())
	link := filepath.Join(t.TempDir(), "stdout")
	symlink(t, fdPath, link)
	got := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(r)
		got <- string(b)
	}()
	for _, path := range []string{link, fdPath} {
		if err := WriteFile(path, []byte(path+"\n"), 0o644); err != nil {
			t.Fatalf("WriteFile(%s): %v", path, err)
		}
	}
	w.Close()
	if want := link + "\n" + fdPath + "\n"; <-got != want {
		t.Errorf("the pipe received something else than %q", want)
	}
	desttest.KeptLink(t, link, fdPath)
}

// A destination that is the file behind standard output (/dev/stdout
// redirected to a file) is written through the stream, after what it
// already wrote, not over it from offset 0 nor by replacing the file.
func TestWriteFileToStandardOutputFile(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "stdout.txt"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	saved := os.Stdout
	os.Stdout = f
	defer func() { os.Stdout = saved }()
	fmt.Fprint(os.Stdout, "before\n")
	link := filepath.Join(t.TempDir(), "stdout")
	symlink(t, f.Name(), link)
	if err := WriteFile(link, []byte("ids\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(os.Stdout, "after\n")
	os.Stdout = saved
	hasContent(t, f.Name(), "before\nids\nafter\n")
	desttest.KeptLink(t, link, f.Name())
}

func TestOutputDir(t *testing.T) {
	for _, tc := range []struct {
		name string
		// setup returns the output path and the target OutputDir must
		// report ("" when it must refuse).
		setup   func(t *testing.T, dir, other string) (path, target string)
		exists  bool
		wantErr string
	}{
		{"absent", func(t *testing.T, dir, _ string) (string, string) {
			return filepath.Join(dir, "out"), filepath.Join(dir, "out")
		}, false, ""},
		{"a directory", func(t *testing.T, dir, _ string) (string, string) {
			return dir, dir
		}, true, ""},
		{"a directory with a trailing slash", func(t *testing.T, dir, _ string) (string, string) {
			return dir + "/", dir
		}, true, ""},
		{"symlink to a directory", func(t *testing.T, dir, other string) (string, string) {
			symlink(t, other, filepath.Join(dir, "out"))
			return filepath.Join(dir, "out") + "/", resolved(t, other)
		}, true, ""},
		{"chain of symlinks to a directory", func(t *testing.T, dir, other string) (string, string) {
			symlink(t, other, filepath.Join(dir, "mid"))
			symlink(t, "mid", filepath.Join(dir, "out"))
			return filepath.Join(dir, "out"), resolved(t, other)
		}, true, ""},
		{"dangling symlink", func(t *testing.T, dir, other string) (string, string) {
			symlink(t, filepath.Join(other, "new"), filepath.Join(dir, "out"))
			return filepath.Join(dir, "out"), filepath.Join(resolved(t, other), "new")
		}, false, ""},
		{"dangling symlink into a missing directory", func(t *testing.T, dir, other string) (string, string) {
			symlink(t, filepath.Join(other, "a", "new"), filepath.Join(dir, "out"))
			return filepath.Join(dir, "out"), ""
		}, false, "cannot be reached"},
		{"a regular file", func(t *testing.T, dir, _ string) (string, string) {
			writeFile(t, filepath.Join(dir, "out"), "x")
			return filepath.Join(dir, "out"), ""
		}, false, "is a regular file, not a directory; remove it or name another output directory"},
		{"symlink to a regular file", func(t *testing.T, dir, other string) (string, string) {
			writeFile(t, filepath.Join(other, "f"), "x")
			symlink(t, filepath.Join(other, "f"), filepath.Join(dir, "out"))
			return filepath.Join(dir, "out"), ""
		}, false, "a regular file, not a directory"},
		{"a FIFO", func(t *testing.T, dir, _ string) (string, string) {
			desttest.Mkfifo(t, filepath.Join(dir, "out"))
			return filepath.Join(dir, "out"), ""
		}, false, "is a named pipe, not a directory"},
		{"null device", func(t *testing.T, _, _ string) (string, string) {
			return os.DevNull, ""
		}, false, "is a device, not a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, want := tc.setup(t, t.TempDir(), t.TempDir())
			target, exists, err := OutputDir(path)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), filepath.Clean(path)) {
					t.Errorf("OutputDir(%s) = %s, %v, %v; want an error naming it and saying %q", path, target, exists, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if resolved(t, filepath.Dir(target)) != resolved(t, filepath.Dir(want)) || filepath.Base(target) != filepath.Base(want) || exists != tc.exists {
				t.Errorf("OutputDir(%s) = %s, %v; want %s, %v", path, target, exists, want, tc.exists)
			}
		})
	}
}

func resolved(t *testing.T, path string) string {
	t.Helper()
	r, err := filepath.EvalSymlinks(path)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// makeOutput builds a new output directory for path the way its users
// do: TempDir, a file in it, CommitDir.
func makeOutput(path, content string, replace bool) error {
	tmp, err := TempDir(path)
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp) // a no-op once committed
	if err := os.WriteFile(filepath.Join(tmp, "config.json"), []byte(content), 0o644); err != nil {
		return err
	}
	return CommitDir(tmp, path, replace)
}

func TestCommitDir(t *testing.T) {
	for _, tc := range []struct {
		name string
		// setup returns the output path and the directory whose
		// config.json must hold the result ("" when it must fail).
		setup   func(t *testing.T, dir, other string) (path, result string)
		replace bool
		wantErr string
		// check runs afterwards, also on failure.
		check func(t *testing.T, dir, other string)
	}{
		{"new", func(t *testing.T, dir, _ string) (string, string) {
			return filepath.Join(dir, "out"), filepath.Join(dir, "out")
		}, false, "", nil},
		{"existing, replaced", func(t *testing.T, dir, _ string) (string, string) {
			out := filepath.Join(dir, "out")
			if err := makeOutput(out, "old", false); err != nil {
				t.Fatal(err)
			}
			return out, out
		}, true, "", nil},
		{"existing, not replaced", func(t *testing.T, dir, _ string) (string, string) {
			out := filepath.Join(dir, "out")
			if err := makeOutput(out, "old", false); err != nil {
				t.Fatal(err)
			}
			return out, ""
		}, false, "output exists", func(t *testing.T, dir, _ string) {
			hasContent(t, filepath.Join(dir, "out", "config.json"), "old")
		}},
		{"symlink to an existing output, replaced", func(t *testing.T, dir, other string) (string, string) {
			real := filepath.Join(other, "real")
			if err := makeOutput(real, "old", false); err != nil {
				t.Fatal(err)
			}
			symlink(t, real, filepath.Join(dir, "out"))
			return filepath.Join(dir, "out"), real
		}, true, "", func(t *testing.T, dir, other string) {
			desttest.KeptLink(t, filepath.Join(dir, "out"), filepath.Join(other, "real"))
		}},
		{"symlink to an existing output, not replaced", func(t *testing.T, dir, other string) (string, string) {
			real := filepath.Join(other, "real")
			if err := makeOutput(real, "old", false); err != nil {
				t.Fatal(err)
			}
			symlink(t, real, filepath.Join(dir, "out"))
			return filepath.Join(dir, "out"), ""
		}, false, "output exists", func(t *testing.T, dir, other string) {
			desttest.KeptLink(t, filepath.Join(dir, "out"), filepath.Join(other, "real"))
			hasContent(t, filepath.Join(other, "real", "config.json"), "old")
		}},
		{"dangling symlink", func(t *testing.T, dir, other string) (string, string) {
			symlink(t, filepath.Join(other, "real"), filepath.Join(dir, "out"))
			return filepath.Join(dir, "out"), filepath.Join(other, "real")
		}, false, "", func(t *testing.T, dir, other string) {
			desttest.KeptLink(t, filepath.Join(dir, "out"), filepath.Join(other, "real"))
		}},
		{"a regular file", func(t *testing.T, dir, _ string) (string, string) {
			writeFile(t, filepath.Join(dir, "out"), "mine")
			return filepath.Join(dir, "out"), ""
		}, true, "is a regular file, not a directory", func(t *testing.T, dir, _ string) {
			hasContent(t, filepath.Join(dir, "out"), "mine")
		}},
		{"a FIFO", func(t *testing.T, dir, _ string) (string, string) {
			desttest.Mkfifo(t, filepath.Join(dir, "out"))
			return filepath.Join(dir, "out"), ""
		}, true, "is a named pipe, not a directory", func(t *testing.T, dir, _ string) {
			if fi, err := os.Lstat(filepath.Join(dir, "out")); err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
				t.Errorf("the FIFO is now %v (%v)", modeOf(fi), err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, other := t.TempDir(), t.TempDir()
			path, result := tc.setup(t, dir, other)
			err := makeOutput(path, "new", tc.replace)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("error %v, want one saying %q", err, tc.wantErr)
				}
				if tc.wantErr == "output exists" && !errors.Is(err, ErrOutputExists) {
					t.Errorf("error %v does not match ErrOutputExists", err)
				}
			} else if err != nil {
				t.Fatal(err)
			} else {
				hasContent(t, filepath.Join(result, "config.json"), "new")
			}
			if tc.check != nil {
				tc.check(t, dir, other)
			}
			for _, d := range []string{dir, other} {
				for _, name := range desttest.DirNames(t, d) {
					if strings.Contains(name, ".partial-") {
						t.Errorf("%s holds %s afterwards", d, name)
					}
				}
			}
		})
	}
}

func TestInside(t *testing.T) {
	base := t.TempDir()
	src := filepath.Join(base, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	links := t.TempDir()
	symlink(t, src, filepath.Join(links, "src"))
	symlink(t, filepath.Join(src, "new"), filepath.Join(links, "dangling-in-src"))
	symlink(t, filepath.Join(base, "elsewhere"), filepath.Join(links, "dangling-elsewhere"))
	for _, tc := range []struct {
		path, dir string
		want      bool
	}{
		{src, src, true},
		{filepath.Join(src, "a", "b"), src, true},
		{src + "-sibling", src, false},
		{base, src, false},
		{filepath.Join(links, "src"), src, true},
		{filepath.Join(links, "src", "x"), src, true},
		{src, filepath.Join(links, "src"), true},
		{filepath.Join(links, "dangling-in-src"), src, true},
		{filepath.Join(links, "dangling-elsewhere"), src, false},
	} {
		if got := Inside(tc.path, tc.dir); got != tc.want {
			t.Errorf("Inside(%s, %s) = %v, want %v", tc.path, tc.dir, got, tc.want)
		}
	}
}

// A replaced file keeps its permissions (a private file stays private); a
// new file gets perm less the umask, as a file the shell creates does.
func TestWriteFilePermissions(t *testing.T) {
	dir := t.TempDir()
	private := filepath.Join(dir, "private.json")
	if err := os.WriteFile(private, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(private, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(private, []byte("new"), 0o644); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(private); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("replaced file: mode %v (%v), want 0600 kept", fi.Mode().Perm(), err)
	}
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	fresh := filepath.Join(dir, "fresh.json")
	if err := WriteFile(fresh, []byte("new"), 0o644); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(fresh); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("new file under umask 077: mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
}
