package atomicfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// OutputDir resolves path, an output directory to create or replace.
// target is the directory that is written: path itself, or, when path is
// a symbolic link (or a chain of them), the directory it leads to, which
// a dangling link creates; the link is kept. exists tells whether target
// is an existing directory. A path that is, or leads to, anything but a
// directory (a regular file, a device, a named pipe) is refused with an
// error naming it, as is a link into a directory that does not exist.
func OutputDir(path string) (target string, exists bool, err error) {
	path = filepath.Clean(path) // "link/" would make Lstat follow the link
	target, info, err := resolve(path)
	if err != nil {
		return "", false, fmt.Errorf("output %s: %w", path, err)
	}
	if info == nil {
		if target != path {
			// The directory holding the new target must exist, as
			// for a plain path; say which before any work is done.
			if fi, err := os.Stat(filepath.Dir(target)); err != nil || !fi.IsDir() {
				return "", false, fmt.Errorf("output %s is a symbolic link to %s, whose parent is not an existing directory; create it or name another output directory", path, target)
			}
		}
		return target, false, nil
	}
	if !info.IsDir() {
		return "", false, fmt.Errorf("output %s: %s, not a directory; remove it or name another output directory", path, describe(path, target, info))
	}
	return target, true, nil
}

// TempDir creates the directory in which the new content of the output
// directory path is built: a hidden sibling of its target (see OutputDir),
// .NAME.partial-RANDOM, so that CommitDir can rename it into place on the
// same file system. It is created with mode 0700, as os.MkdirTemp does.
func TempDir(path string) (string, error) {
	target, _, err := OutputDir(path)
	if err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(target), "."+filepath.Base(target)+".partial-")
	if err != nil {
		return "", fmt.Errorf("create output %s: %w", path, err)
	}
	return tmp, nil
}

// ErrOutputExists is matched (errors.Is) by CommitDir's error when the
// output exists and replace is false.
var ErrOutputExists = errors.New("output exists")

// CommitDir moves the complete directory tmp, made by TempDir(path), into
// place as path's target and syncs the directory holding it. An existing
// target is replaced only when replace is set: exchanged with tmp in one
// atomic rename where the platform can (see Exchange), otherwise moved
// aside to tmp.old for the moment of the rename; the old content is
// removed after. A link at path is kept, its target replaced. Without
// replace, an existing target fails with an error matching
// ErrOutputExists and tmp is left for the caller to remove.
func CommitDir(tmp, path string, replace bool) error {
	target, exists, err := OutputDir(path)
	if err != nil {
		return err
	}
	var old string
	if exists {
		if !replace {
			return fmt.Errorf("output %s: %w", path, ErrOutputExists)
		}
		err := Exchange(tmp, target)
		if err == nil {
			// tmp now holds the previous output.
			if err := os.RemoveAll(tmp); err != nil {
				return fmt.Errorf("remove the replaced output, now %s: %w", tmp, err)
			}
			return syncParent(path, target)
		}
		if !errors.Is(err, errors.ErrUnsupported) {
			return fmt.Errorf("replace %s: %w", path, err)
		}
		old = tmp + ".old"
		if err := os.Rename(target, old); err != nil {
			return fmt.Errorf("replace %s: %w", path, err)
		}
	}
	if err := os.Rename(tmp, target); err != nil {
		if old != "" {
			if rerr := os.Rename(old, target); rerr != nil {
				return fmt.Errorf("move the result into %s: %w; the previous output is kept as %s (restoring it failed: %v)", path, err, old, rerr)
			}
		}
		return fmt.Errorf("move the result into %s: %w", path, err)
	}
	if old != "" {
		if err := os.RemoveAll(old); err != nil {
			return fmt.Errorf("remove the replaced %s: %w", old, err)
		}
	}
	return syncParent(path, target)
}

// syncParent syncs the directory holding target, so that the renamed
// output survives a crash.
func syncParent(path, target string) error {
	if err := SyncDir(filepath.Dir(target)); err != nil {
		return fmt.Errorf("output %s is complete but: %w", path, err)
	}
	return nil
}

// Inside reports whether path is dir or lies inside it, both compared with
// their symbolic links resolved as far as they exist, so that an output
// that names its input through a link is recognised.
func Inside(path, dir string) bool {
	rel, err := filepath.Rel(resolvedPath(dir), resolvedPath(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator))
}

// resolvedPath is path made absolute with its symbolic links resolved, as
// far as it exists; a dangling link stands for the target it would create.
func resolvedPath(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return path
	}
	if t, info, err := resolve(abs); err == nil && info == nil {
		abs = t // absent: abs itself; dangling: the target, absolute
	}
	rest := "" // the trailing elements that do not exist
	for p := abs; ; {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			return filepath.Join(r, rest)
		}
		parent := filepath.Dir(p)
		if parent == p {
			return abs
		}
		rest = filepath.Join(filepath.Base(p), rest)
		p = parent
	}
}
