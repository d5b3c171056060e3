package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// mountTmpfs mounts a tmpfs of size bytes on a new directory, or skips the
// test where mounting is not permitted.
func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d", size)); err != nil {
		if errors.Is(err, syscall.EPERM) {
			t.Skipf("mounting a tmpfs needs CAP_SYS_ADMIN (%v); convert's TestRunFailedWriteLeavesOutputAsItWas injects the same failure without it", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// TestConvertFullDisk converts onto small tmpfs file systems that fill up
// at different points: in the weights, in config.json, in tokenizer.json,
// and while replacing a previous output. Each run must fail with exit 1
// and one line naming the cause, and leave the file system as it was.
func TestConvertFullDisk(t *testing.T) {
	src := synthetic(t)
	// ref is what the failing runs would write; previous an older output.
	ref, previous := filepath.Join(t.TempDir(), "ref"), filepath.Join(t.TempDir(), "previous")
	for dir, dc := range map[string]string{ref: "48", previous: "32"} {
		if _, stderr, code := run(t, "convert", src, "--dc", dc, "-o", dir); code != 0 {
			t.Fatalf("reference conversion: %s", stderr)
		}
	}
	const page = 4096 // tmpfs allocates whole pages
	pages := func(name string) int64 {
		fi, err := os.Stat(filepath.Join(ref, name))
		if err != nil {
			t.Fatal(err)
		}
		return (fi.Size() + page - 1) / page
	}
	weights, config := pages("model.safetensors"), pages("config.json")
	total := weights + config + pages("tokenizer.json")
	for _, tc := range []struct {
		name     string
		size     int64 // bytes
		previous bool  // a previous output fills part of the disk
	}{
		{"full at the first buffer flush", 4 * page, false},
		{"full half way through the weights", weights / 2 * page, false},
		{"full at config.json", weights * page, false},
		{"full at tokenizer.json", (weights + config) * page, false},
		{"full while replacing a previous output", (total + weights/2) * page, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			disk := mountTmpfs(t, tc.size)
			out := filepath.Join(disk, "out")
			if tc.previous {
				if err := os.CopyFS(out, os.DirFS(previous)); err != nil {
					t.Fatal(err)
				}
			}
			before := dirDigest(t, out)
			_, stderr, code := run(t, "convert", src, "--dc", "48", "-o", out, "--force")
			line := strings.TrimSpace(stderr)
			t.Logf("exit %d: %s", code, line)
			if code != exitError || strings.Contains(line, "\n") || !strings.Contains(line, "no space left on device") {
				t.Errorf("exit %d, stderr %q; want exit %d and one line saying the disk is full", code, stderr, exitError)
			}
			if dirDigest(t, out) != before {
				t.Errorf("%s changed", out)
			}
			entries, _ := os.ReadDir(disk)
			if want := map[bool]int{false: 0, true: 1}[tc.previous]; len(entries) != want {
				t.Errorf("the disk holds %v", entries)
			}
		})
	}
}
