// Package sharedtest locates the project's shared reference material
// (../shared beside the repository) for tests, and skips tests cleanly
// where it is absent.
package sharedtest

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// Path returns the absolute path of rel inside ../shared, or skips the test
// with a message naming what is missing.
func Path(t testing.TB, rel string) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Skip("sharedtest: cannot locate the repository")
	}
	// this file is <repo>/internal/sharedtest/sharedtest.go
	p := filepath.Join(filepath.Dir(file), "..", "..", "..", "shared", rel)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("shared material %s not found (../shared is absent outside CI): %v", rel, err)
	}
	return p
}
