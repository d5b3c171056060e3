//go:build !(openblas && (linux || darwin) && (amd64 || arm64))

package kernels

import "errors"

// newOpenBLASBackend fails: loading a C library at run time (purego) would
// make every binary dynamically linked against libc, so it is opt-in.
func newOpenBLASBackend() (Backend, error) {
	return nil, errors.New("openblas: this binary was built without OpenBLAS support; rebuild with `go build -tags openblas` (linux or darwin, amd64 or arm64) and install the library with `apt-get install libopenblas0`")
}
