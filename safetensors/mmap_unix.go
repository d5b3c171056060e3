//go:build unix

package safetensors

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// mapFile maps the first size bytes of f read-only. Mapping lets tensors be
// decoded straight from the page cache without an intermediate copy, and
// only the pages actually read are loaded.
func mapFile(f *os.File, size int64) ([]byte, error) {
	if size <= 0 || int64(int(size)) != size {
		return nil, errors.New("file size not mappable")
	}
	return unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
}

// unmapFile releases a mapping made by mapFile.
func unmapFile(b []byte) error {
	return unix.Munmap(b)
}

// releaseMapped advises the kernel that the n mapped bytes at offset off of
// mem, a mapping made by mapFile, have been decoded and are not needed
// again soon. On Linux they leave the process's resident set (they stay in
// the page cache), so streaming through a checkpoint larger than memory
// does not grow it; elsewhere this is a hint. The partial pages at either
// end, which may hold neighbouring tensors, are kept.
func releaseMapped(mem []byte, off, n int64) {
	page := int64(os.Getpagesize())
	start, end := (off+page-1)/page*page, (off+n)/page*page
	if start < end {
		// Advice only: a failure changes nothing but the resident size.
		_ = unix.Madvise(mem[start:end], unix.MADV_DONTNEED)
	}
}
