// Package desttest holds the helpers of tests that write to output
// destinations other than regular files — links, named pipes, devices —
// and check what is left there afterwards.
package desttest

import (
	"io"
	"io/fs"
	"os"
	"testing"
	"time"
)

// ReadInBackground opens a reader with open and reads it to its end in a
// goroutine (a named pipe's open waits for its writer); the returned
// function waits for what was read, or for the error, as text.
func ReadInBackground(t testing.TB, open func() (io.ReadCloser, error)) func() string {
	t.Helper()
	got := make(chan string, 1)
	go func() {
		r, err := open()
		if err != nil {
			got <- "open: " + err.Error()
			return
		}
		defer r.Close()
		b, err := io.ReadAll(r)
		if err != nil {
			got <- "read: " + err.Error()
			return
		}
		got <- string(b)
	}()
	return func() string {
		select {
		case s := <-got:
			return s
		case <-time.After(60 * time.Second): // a hang guard, not a timing
			t.Fatal("the reader received nothing")
			return ""
		}
	}
}

// ReadFile is ReadInBackground of the file (typically a named pipe) at path.
func ReadFile(t testing.TB, path string) func() string {
	t.Helper()
	return ReadInBackground(t, func() (io.ReadCloser, error) { return os.Open(path) })
}

// KeptLink fails t unless link is still a symbolic link to want.
func KeptLink(t testing.TB, link, want string) {
	t.Helper()
	if got, err := os.Readlink(link); err != nil || got != want {
		t.Errorf("%s links to %q (%v), want the link to %q kept", link, got, err, want)
	}
}

// KeptFIFO fails t unless path is still a named pipe.
func KeptFIFO(t testing.TB, path string) {
	t.Helper()
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
		t.Errorf("%s is no longer a named pipe (%v)", path, err)
	}
}

// DirNames lists the names in dir, sorted.
func DirNames(t testing.TB, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}
