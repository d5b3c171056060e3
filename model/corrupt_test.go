package model

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// corruptible writes the small synthetic checkpoint and returns its
// directory, its model.safetensors bytes and header length, and the model
// it loads as.
func corruptible(t *testing.T) (dir string, file []byte, header int, m *Model) {
	t.Helper()
	dir = writeSmall(t, smallSpec())
	file, err := os.ReadFile(filepath.Join(dir, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	m, err = Load(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	return dir, file, 8 + int(binary.LittleEndian.Uint64(file)), m
}

// loadVariant writes weights as dir's model.safetensors and loads dir.
func loadVariant(t *testing.T, dir string, weights []byte) (*Model, error) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "model.safetensors"), weights, 0o644); err != nil {
		t.Fatal(err)
	}
	return Load(context.Background(), dir, nil)
}

// checkRejection fails t unless err is one line naming the weights file.
func checkRejection(t *testing.T, what string, err error) {
	t.Helper()
	if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, "model.safetensors") {
		t.Fatalf("%s: error %q is not one line naming model.safetensors", what, msg)
	}
}

// TestHeaderBitFlips flips bits of the length field and JSON header of a
// checkpoint, one at a time: every bit of the length field, and two bits
// of each header byte (which two rotates with the position, so every bit
// position is covered throughout the header). Load must reject the file
// with a one-line error naming it, or load exactly the original weights (a
// flip in the free-form metadata changes nothing the model uses); never
// panic, never load different weights.
func TestHeaderBitFlips(t *testing.T) {
	dir, file, header, orig := corruptible(t)
	work := t.TempDir()
	if err := os.Link(filepath.Join(dir, "config.json"), filepath.Join(work, "config.json")); err != nil {
		t.Fatal(err)
	}
	rejected, same := 0, 0
	flipped := make([]byte, len(file))
	for pos := range header {
		bits := []int{pos % 8, (pos + 3) % 8}
		if pos < 8 {
			bits = []int{0, 1, 2, 3, 4, 5, 6, 7}
		}
		for _, bit := range bits {
			copy(flipped, file)
			flipped[pos] ^= 1 << bit
			m, err := loadVariant(t, work, flipped)
			what := fmt.Sprintf("bit %d of byte %d", bit, pos)
			if err != nil {
				checkRejection(t, what, err)
				rejected++
				continue
			}
			if !reflect.DeepEqual(m, orig) {
				t.Fatalf("%s: the file loads, with different weights or config", what)
			}
			same++
		}
	}
	t.Logf("%d single-bit flips in a %d-byte header: %d rejected, %d load the original weights", rejected+same, header, rejected, same)
}

// TestTruncatedCheckpoint cuts the weights file at every length inside the
// header and at a spread of lengths inside the data: each prefix must be
// rejected with a one-line error naming the file.
func TestTruncatedCheckpoint(t *testing.T) {
	dir, file, header, _ := corruptible(t)
	var lengths []int
	for n := range header + 64 {
		lengths = append(lengths, n)
	}
	for n := header + 64; n < len(file); n += 997 {
		lengths = append(lengths, n)
	}
	lengths = append(lengths, len(file)-1)
	for _, n := range lengths {
		_, err := loadVariant(t, dir, file[:n])
		if err == nil {
			t.Fatalf("the first %d of %d bytes load", n, len(file))
		}
		checkRejection(t, fmt.Sprintf("truncated to %d bytes", n), err)
	}
	t.Logf("%d truncations of a %d-byte file rejected", len(lengths), len(file))
}
