//go:build !unix

package safetensors

import (
	"errors"
	"os"
)

// mapFile always fails on platforms without a unix mmap, which makes the
// reader fall back to ReadAt on the open file.
func mapFile(*os.File, int64) ([]byte, error) {
	return nil, errors.New("memory mapping not supported")
}

// unmapFile exists only to satisfy the reader's calls; with mapFile always
// failing there is never a mapping to release.
func unmapFile([]byte) error {
	return nil
}

// releaseMapped exists only to satisfy the reader's calls, like unmapFile.
func releaseMapped([]byte, int64, int64) {}
