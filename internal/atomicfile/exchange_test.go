package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

func TestExchange(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, d := range []string{a, b} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "name"), []byte(filepath.Base(d)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	err := Exchange(a, b)
	if runtime.GOOS != "linux" {
		if !errors.Is(err, errors.ErrUnsupported) {
			t.Fatalf("Exchange on %s: %v, want ErrUnsupported", runtime.GOOS, err)
		}
		return
	}
	if errors.Is(err, errors.ErrUnsupported) {
		t.Skipf("the file system of %s cannot exchange: %v", dir, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	for d, want := range map[string]string{a: "b", b: "a"} {
		got, err := os.ReadFile(filepath.Join(d, "name"))
		if err != nil || string(got) != want {
			t.Errorf("%s holds %q (%v), want %q", d, got, err, want)
		}
	}
	if err := Exchange(a, filepath.Join(dir, "absent")); err == nil || errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Exchange with a missing entry: %v, want a plain error", err)
	}
}

func TestSyncDir(t *testing.T) {
	if err := SyncDir(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if err := SyncDir(filepath.Join(t.TempDir(), "absent")); err == nil && runtime.GOOS != "windows" {
		t.Error("SyncDir of a missing directory succeeded")
	}
}
