package atomicfile

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Exchange atomically swaps the directory entries a and b, which must both
// exist, with renameat2(RENAME_EXCHANGE): at every moment each name holds
// one complete entry. It fails with an error matching errors.ErrUnsupported
// where the kernel or file system cannot exchange.
func Exchange(a, b string) error {
	err := unix.Renameat2(unix.AT_FDCWD, a, unix.AT_FDCWD, b, unix.RENAME_EXCHANGE)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("exchange %s and %s: %w (%w)", a, b, errors.ErrUnsupported, err)
	}
	return fmt.Errorf("exchange %s and %s: %w", a, b, err)
}
