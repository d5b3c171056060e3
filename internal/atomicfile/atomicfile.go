// Package atomicfile writes output files and directories so that readers
// see either the old content or the complete new one, never a partial
// write, and so that what the user named as the destination receives the
// output instead of being replaced: a symbolic link is written through
// (its target replaced, the link kept), and a device or named pipe is
// written to as the stream it is.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
)

// WriteFile writes data to path, according to what path is:
//
//   - absent, or a regular file: data goes to a temporary file in the same
//     directory, is synced, and the temporary file is renamed over path, so
//     path holds the old content or the new, never a part;
//   - a symbolic link (or a chain of them): the same for the file the link
//     leads to, which a dangling link creates as a shell redirection
//     would; the links themselves are kept;
//   - a character or block device or a named pipe (/dev/null, a FIFO, a
//     terminal, /dev/stdout when standard output is a pipe): data is
//     written to it directly, without temporary file, rename or
//     truncation; opening a FIFO waits for a reader;
//   - the file behind this process's standard output or error (for
//     /dev/stdout redirected to a file): data is written through that
//     stream, so it lands where the stream's other output does.
//
// A directory, a socket or a loop of links is refused with an error
// naming path; nothing is changed then. A file created gets perm less the
// umask; a file replaced keeps its permissions. On error no temporary file
// is left behind.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	if std := standardStream(path); std != nil {
		if _, err := std.Write(data); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
		return nil
	}
	target, info, err := resolve(path)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	switch mode := modeOf(info); {
	case info == nil:
		return replace(path, target, data, perm, false)
	case mode.IsRegular():
		// A replaced file keeps its permissions (a private file stays
		// private).
		return replace(path, target, data, mode.Perm(), true)
	case isStream(mode):
		return writeStream(path, target, data)
	default:
		return notWritable(path, target, info)
	}
}

// notWritable is the error for a destination WriteFile does not write.
func notWritable(path, target string, info fs.FileInfo) error {
	return fmt.Errorf("write %s: %s, which a file cannot replace; remove it, or write to another path", path, describe(path, target, info))
}

// standardStream returns os.Stdout or os.Stderr when path leads to the
// same file, else nil. Writing through a second descriptor would start at
// offset 0 of a redirected file, over what the stream wrote, and a rename
// would detach the file the stream still writes to.
func standardStream(path string) *os.File {
	fi, err := os.Stat(path)
	if err != nil {
		return nil
	}
	for _, std := range []*os.File{os.Stdout, os.Stderr} {
		if std == nil {
			continue
		}
		if si, err := std.Stat(); err == nil && os.SameFile(fi, si) {
			return std
		}
	}
	return nil
}

// replace writes data to a temporary file beside target, syncs it and
// renames it over target. The file gets perm as a new file does, less the
// umask, or exactly perm when exact (a replaced file's own).
func replace(path, target string, data []byte, perm os.FileMode, exact bool) error {
	f, err := createTemp(filepath.Dir(target), "."+filepath.Base(target)+".tmp", perm)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && exact {
		err = os.Chmod(tmp, perm)
	}
	if err == nil {
		err = os.Rename(tmp, target)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// createTemp creates a new file prefix+random in dir with mode perm
// (less the umask, which the system applies to a file it creates, unlike
// to a later chmod).
func createTemp(dir, prefix string, perm os.FileMode) (*os.File, error) {
	for range 100 {
		name := filepath.Join(dir, prefix+strconv.FormatUint(rand.Uint64(), 36))
		f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, perm)
		if !errors.Is(err, fs.ErrExist) {
			return f, err
		}
	}
	return nil, fmt.Errorf("no unused temporary name %s* in %s", prefix, dir)
}

// writeStream writes data to the device or named pipe target as it is.
func writeStream(path, target string, data []byte) error {
	// Neither O_CREATE nor O_TRUNC: the entry exists, and truncating
	// means nothing to a stream.
	f, err := os.OpenFile(target, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	// Between the look and the open the entry may have been replaced by
	// a regular file, which writing in place would corrupt.
	if fi, err := f.Stat(); err == nil && !isStream(fi.Mode()) {
		f.Close()
		if fi.Mode().IsRegular() {
			return replace(path, target, data, fi.Mode().Perm(), true)
		}
		return notWritable(path, target, fi)
	}
	_, err = f.Write(data)
	// No Sync: pipes and terminals cannot, and a reader already has
	// what was written.
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func isStream(m fs.FileMode) bool {
	return m&(fs.ModeDevice|fs.ModeCharDevice|fs.ModeNamedPipe) != 0
}

// SyncDir flushes the entries of directory dir to stable storage, so that
// files created or renamed in it survive a crash. Windows cannot sync a
// directory; there it does nothing.
func SyncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// maxLinks bounds a chain of symbolic links, as the kernel's own limit
// (40 on Linux) does, so that a loop ends in an error.
const maxLinks = 40

// resolve finds what path leads to. target is path itself unless path is
// a symbolic link to a regular file, a directory or nothing; then it is the
// end of the link chain, with the directories on the way resolved, so that
// a temporary file created beside target can be renamed over it. A link
// to a device or pipe keeps target = path, opened through the link. info
// describes what path leads to, or is nil when that does not exist: path
// is absent or a dangling link.
func resolve(path string) (target string, info fs.FileInfo, err error) {
	info, err = os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return path, nil, nil
	}
	if err != nil {
		return "", nil, err
	}
	if info.Mode()&fs.ModeSymlink == 0 {
		return path, info, nil
	}
	// os.Stat follows the chain as the kernel does, also through the
	// magic links of /proc (/dev/stdout → /proc/self/fd/1 → pipe:[…]),
	// whose text names no file; it tells what the chain ends in.
	if fi, err := os.Stat(path); err == nil {
		if isStream(fi.Mode()) {
			return path, fi, nil
		}
		t, err := filepath.EvalSymlinks(path)
		if err != nil {
			return "", nil, err
		}
		return t, fi, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		// A loop makes Stat fail; following the chain by hand says so.
		if _, lerr := danglingTarget(path); lerr != nil {
			return "", nil, lerr
		}
		return "", nil, err
	}
	t, err := danglingTarget(path)
	if err != nil {
		return "", nil, err
	}
	return t, nil, nil
}

// danglingTarget follows the chain of links from path, which ends in a
// name that does not exist, and returns that name with its directory
// resolved.
func danglingTarget(path string) (string, error) {
	p := path
	for range maxLinks {
		fi, err := os.Lstat(p)
		if err != nil || fi.Mode()&fs.ModeSymlink == 0 {
			return p, nil
		}
		link, err := os.Readlink(p)
		if err != nil {
			return "", err
		}
		if !filepath.IsAbs(link) {
			// Not filepath.Join: cleaning "a/../b" lexically is wrong
			// when a is a link; EvalSymlinks below walks it as the
			// kernel does.
			link = filepath.Dir(p) + string(filepath.Separator) + link
		}
		dir, base := splitLast(link)
		if base == "" || base == "." || base == ".." {
			return "", fmt.Errorf("the symbolic link %s leads to %s, which does not name a file", path, link)
		}
		// The directory the chain leads into must exist; resolved, it
		// holds no links, so joining the next link text to it is exact.
		rdir, err := filepath.EvalSymlinks(dir)
		if err != nil {
			return "", fmt.Errorf("the symbolic link %s leads to %s, whose directory cannot be reached: %w", path, link, err)
		}
		p = filepath.Join(rdir, base)
	}
	return "", fmt.Errorf("more than %d symbolic links from %s (a loop?)", maxLinks, path)
}

// splitLast splits path after its last separator, without cleaning it;
// dir is "." when path has none.
func splitLast(path string) (dir, base string) {
	i := len(path) - 1
	for i >= len(filepath.VolumeName(path)) && !os.IsPathSeparator(path[i]) {
		i--
	}
	if i < 0 {
		return ".", path
	}
	return path[:i+1], path[i+1:]
}

// modeOf is info's mode, 0 for nil.
func modeOf(info fs.FileInfo) fs.FileMode {
	if info == nil {
		return 0
	}
	return info.Mode()
}

// describe says what is at path (through its links, target) in a few
// words, for errors.
func describe(path, target string, info fs.FileInfo) string {
	what := "not a regular file"
	switch m := info.Mode(); {
	case m.IsDir():
		what = "a directory"
	case m.IsRegular():
		what = "a regular file"
	case m&fs.ModeNamedPipe != 0:
		what = "a named pipe"
	case m&fs.ModeDevice != 0:
		what = "a device"
	case m&fs.ModeSocket != 0:
		what = "a socket"
	}
	if target != path {
		return fmt.Sprintf("it is a symbolic link to %s, %s", target, what)
	}
	return "it is " + what
}
