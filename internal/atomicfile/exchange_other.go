//go:build !linux

package atomicfile

import (
	"errors"
	"fmt"
)

// Exchange would atomically swap the directory entries a and b; only Linux
// offers that, so elsewhere it fails with an error matching
// errors.ErrUnsupported.
func Exchange(a, b string) error {
	return fmt.Errorf("exchange %s and %s: %w", a, b, errors.ErrUnsupported)
}
