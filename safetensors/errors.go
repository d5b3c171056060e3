package safetensors

import (
	"errors"
	"fmt"
)

// Sentinel errors. Errors returned by this package wrap one of these, so
// callers can classify failures with errors.Is while the message still names
// the file and tensor involved.
var (
	// ErrMalformed reports a checkpoint file or shard index whose structure
	// violates the safetensors format, or an index listing a shard that
	// cannot be opened.
	ErrMalformed = errors.New("malformed checkpoint")

	// ErrNotFound reports a request for a tensor the checkpoint does not hold.
	ErrNotFound = errors.New("tensor not found")

	// ErrUnsupportedDType reports a dtype that cannot be converted to or
	// from float32.
	ErrUnsupportedDType = errors.New("unsupported dtype")

	// ErrLength reports a buffer or a stream whose length disagrees with the
	// tensor's shape and dtype.
	ErrLength = errors.New("length mismatch")

	// ErrClosed reports use of a Checkpoint after Close.
	ErrClosed = errors.New("checkpoint closed")
)

// malformedError is a format violation found while opening a checkpoint.
// Its message has the form "open checkpoint FILE: DETAIL[: CAUSE]" so that
// it names the file, and DETAIL names the tensor where there is one.
type malformedError struct {
	file   string
	detail string
	err    error // underlying cause, such as a JSON syntax error; may be nil
}

func (e *malformedError) Error() string {
	s := "open checkpoint " + e.file + ": " + e.detail
	if e.err != nil {
		s += ": " + e.err.Error()
	}
	return s
}

// Is makes every malformedError match ErrMalformed.
func (e *malformedError) Is(target error) bool { return target == ErrMalformed }

// Unwrap exposes the cause, so errors.Is also finds, for example,
// fs.ErrNotExist for a missing shard.
func (e *malformedError) Unwrap() error { return e.err }

// malformed returns a malformedError for file with a formatted detail.
func malformed(file string, cause error, format string, args ...any) error {
	return &malformedError{file: file, detail: fmt.Sprintf(format, args...), err: cause}
}
