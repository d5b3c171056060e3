// Package safetensors reads and writes checkpoints in the Hugging Face
// safetensors format: single .safetensors files and sharded checkpoints
// described by a model.safetensors.index.json.
//
// Open parses only the headers and validates them strictly; tensor data is
// read on request, from a read-only memory mapping on unix systems and with
// ReadAt elsewhere. WriteCheckpoint streams tensors into new files and
// renames them into place only once complete.
package safetensors

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
)

// Names of the files Open looks for in a directory, and that WriteCheckpoint
// produces with the default prefix.
const (
	defaultPrefix = "model"
	singleSuffix  = ".safetensors"
	indexSuffix   = ".safetensors.index.json"
)

// opener opens checkpoints. Open memory-maps where the platform supports
// it; tests also use an opener without mapping to exercise the ReadAt path
// that other platforms take.
type opener struct{ mmap bool }

// TensorInfo describes one stored tensor.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int  // empty for a scalar
	File  string // path of the file holding the tensor
	Bytes int64  // stored size in bytes
}

// Checkpoint is an opened checkpoint. Its methods may be called
// concurrently, except Close, which must not run concurrently with any other
// method.
type Checkpoint struct {
	path    string             // as given to Open, for read errors
	shards  []*shard           // sorted by path
	tensors map[string]*tensor // by name
	names   []string           // sorted
	closed  bool
}

// shard is one opened .safetensors file.
type shard struct {
	path    string
	mem     []byte   // the whole file when mapped or held in memory
	mapped  bool     // mem came from mapFile and must be unmapped
	f       *os.File // open file for ReadAt when mem is nil
	size    int64
	meta    map[string]string
	tensors []*tensor // in data order
}

// tensor locates one tensor's data.
type tensor struct {
	info  TensorInfo
	elems int
	shard *shard
	off   int64 // file offset of the first byte
}

// Open opens a checkpoint: a .safetensors file, a
// model.safetensors.index.json, or a directory holding either (the index is
// preferred when both exist). Only the headers are read and validated;
// errors wrap ErrMalformed and name the file and, where one is at fault,
// the tensor.
func Open(path string) (*Checkpoint, error) { return opener{mmap: true}.open(path) }

func (o opener) open(path string) (*Checkpoint, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("open checkpoint: %w", err)
	}
	if fi.IsDir() {
		for _, name := range []string{defaultPrefix + indexSuffix, defaultPrefix + singleSuffix} {
			p := filepath.Join(path, name)
			_, err := os.Stat(p)
			if err == nil {
				return o.open(p)
			}
			if !errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("open checkpoint: %w", err)
			}
		}
		return nil, fmt.Errorf("open checkpoint %s: no %s%s or %s%s in directory: %w",
			path, defaultPrefix, indexSuffix, defaultPrefix, singleSuffix, fs.ErrNotExist)
	}
	if !fi.Mode().IsRegular() {
		return nil, malformed(path, nil, "not a regular file")
	}
	if strings.HasSuffix(path, ".json") {
		return o.openIndex(path)
	}
	s, err := o.openShard(path)
	if err != nil {
		if errors.Is(err, ErrMalformed) {
			return nil, err
		}
		return nil, fmt.Errorf("open checkpoint: %w", err)
	}
	return newCheckpoint(path, []*shard{s}), nil
}

// newCheckpoint assembles a Checkpoint from shards whose tensor names are
// known to be distinct.
func newCheckpoint(path string, shards []*shard) *Checkpoint {
	c := &Checkpoint{path: path, shards: shards, tensors: make(map[string]*tensor)}
	for _, s := range shards {
		for _, t := range s.tensors {
			c.tensors[t.info.Name] = t
		}
	}
	c.names = slices.Sorted(maps.Keys(c.tensors))
	return c
}

// openShard opens and validates one .safetensors file. Format errors wrap
// ErrMalformed; others are the file system's, which name the path.
func (o opener) openShard(path string) (*shard, error) {
	// Check the type before opening: opening a FIFO would block.
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, malformed(path, nil, "not a regular file")
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	// Take the size from the opened file: the path may have been replaced
	// since the check, for example by a concurrent WriteCheckpoint.
	if fi, err = f.Stat(); err != nil {
		f.Close()
		return nil, err
	}
	s := &shard{path: path, size: fi.Size()}
	if o.mmap {
		// A failed mapping is not an error: ReadAt works on any file.
		if mem, err := mapFile(f, s.size); err == nil {
			s.mem, s.mapped = mem, true
			f.Close() // the mapping outlives the descriptor
		}
	}
	if !s.mapped {
		s.f = f
	}
	if err := s.parse(); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// readAt fills p from offset off of the file.
func (s *shard) readAt(p []byte, off int64) error {
	if s.mem != nil {
		if off < 0 || off+int64(len(p)) > int64(len(s.mem)) {
			return fmt.Errorf("read %d bytes at offset %d: past end of %d-byte file", len(p), off, len(s.mem))
		}
		copy(p, s.mem[off:])
		return nil
	}
	if _, err := s.f.ReadAt(p, off); err != nil {
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("the file shrank since it was opened: %w", io.ErrUnexpectedEOF)
		}
		return err
	}
	return nil
}

// close releases the mapping or file of s.
func (s *shard) close() error {
	var err error
	if s.mapped {
		err = unmapFile(s.mem)
	}
	if s.f != nil {
		err = errors.Join(err, s.f.Close())
	}
	s.mem, s.mapped, s.f = nil, false, nil
	return err
}

// Close releases the checkpoint's files and mappings. Slices returned by Raw
// must not be used afterwards. Closing again is a no-op.
func (c *Checkpoint) Close() error {
	if c.closed {
		return nil
	}
	c.closed = true
	var errs []error
	for _, s := range c.shards {
		if err := s.close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", s.path, err))
		}
	}
	return errors.Join(errs...)
}

// Names returns the names of all tensors in increasing order.
func (c *Checkpoint) Names() []string {
	return slices.Clone(c.names)
}

// Info describes the named tensor, and reports whether it exists.
func (c *Checkpoint) Info(name string) (TensorInfo, bool) {
	t, ok := c.tensors[name]
	if !ok {
		return TensorInfo{}, false
	}
	info := t.info
	info.Shape = slices.Clone(info.Shape)
	return info, true
}

// Metadata returns a copy of the __metadata__ map of the first file (in
// Files order), or nil if it has none.
func (c *Checkpoint) Metadata() map[string]string {
	if len(c.shards) == 0 {
		return nil
	}
	return maps.Clone(c.shards[0].meta)
}

// Files returns the paths of the checkpoint's .safetensors files in
// increasing order.
func (c *Checkpoint) Files() []string {
	files := make([]string, len(c.shards))
	for i, s := range c.shards {
		files[i] = s.path
	}
	return files
}

// lookup finds the named tensor in an open checkpoint.
func (c *Checkpoint) lookup(name string) (*tensor, error) {
	if c.closed {
		return nil, fmt.Errorf("read tensor %q from %s: %w", name, c.path, ErrClosed)
	}
	t, ok := c.tensors[name]
	if !ok {
		return nil, fmt.Errorf("read tensor %q from %s: %w", name, c.path, ErrNotFound)
	}
	return t, nil
}

// Raw returns the stored bytes of the named tensor. When the file is memory
// mapped the result is a view of the read-only mapping, valid until Close;
// writing to it crashes the program, and so does reading it after another
// process truncated the file (Float32 and ReadFloat32 report that as an
// error instead). Otherwise it is a new slice.
func (c *Checkpoint) Raw(name string) ([]byte, error) {
	t, err := c.lookup(name)
	if err != nil {
		return nil, err
	}
	if m := t.shard.mem; m != nil {
		end := t.off + t.info.Bytes
		return m[t.off:end:end], nil
	}
	b := make([]byte, t.info.Bytes)
	if err := t.shard.readAt(b, t.off); err != nil {
		return nil, t.readError(err)
	}
	return b, nil
}

// Float32 decodes the named tensor into a new slice. BF16, F16, F32, F64
// and I64 tensors are supported; others fail with ErrUnsupportedDType.
func (c *Checkpoint) Float32(name string) ([]float32, error) {
	t, err := c.lookup(name)
	if err != nil {
		return nil, err
	}
	if !decodable(t.info.DType) {
		return nil, t.dtypeError()
	}
	dst := make([]float32, t.elems)
	if err := t.readFloat32(dst); err != nil {
		return nil, err
	}
	return dst, nil
}

// ReadFloat32 decodes the named tensor into dst, whose length must equal the
// tensor's element count. Dtypes are as for Float32.
func (c *Checkpoint) ReadFloat32(name string, dst []float32) error {
	t, err := c.lookup(name)
	if err != nil {
		return err
	}
	if !decodable(t.info.DType) {
		return t.dtypeError()
	}
	if len(dst) != t.elems {
		return fmt.Errorf("read tensor %q from %s: destination holds %d values, shape %v has %d: %w",
			t.info.Name, t.info.File, len(dst), t.info.Shape, t.elems, ErrLength)
	}
	return t.readFloat32(dst)
}

// readChunk is the size of the staging buffer of readFloat32 when the file
// is not mapped; it bounds the extra memory a load needs.
const readChunk = 1 << 20

// readFloat32 decodes t into dst, which has t.elems values.
func (t *tensor) readFloat32(dst []float32) error {
	dt := t.info.DType
	size, _ := dtypeSize(dt)
	if m := t.shard.mem; m != nil {
		if err := decodeMapped(dst, m[t.off:t.off+t.info.Bytes], dt); err != nil {
			return t.readError(err)
		}
		if t.shard.mapped {
			// Decoded tensors are rarely read again; their pages would
			// otherwise make the resident size grow with the checkpoint.
			releaseMapped(m, t.off, t.info.Bytes)
		}
		return nil
	}
	step := readChunk / int(size)
	buf := make([]byte, min(t.info.Bytes, int64(step)*size))
	for i := 0; i < len(dst); i += step {
		d := dst[i:min(i+step, len(dst))]
		b := buf[:int64(len(d))*size]
		if err := t.shard.readAt(b, t.off+int64(i)*size); err != nil {
			return t.readError(err)
		}
		if err := DecodeToFloat32(d, b, dt); err != nil {
			return t.readError(err)
		}
	}
	return nil
}

// decodeMapped is DecodeToFloat32 on memory-mapped src, reporting a fault
// as guardFault does.
func decodeMapped(dst []float32, src []byte, dt DType) error {
	var err error
	if ferr := guardFault(func() { err = DecodeToFloat32(dst, src, dt) }); ferr != nil {
		return ferr
	}
	return err
}

// guardFault runs f, which reads memory-mapped data. Where the file shrank
// since it was mapped (truncated or overwritten in place by another
// process) or its storage fails, touching the mapping faults (SIGBUS);
// that becomes an error here instead of a crash. Other panics of f go on.
func guardFault(f func()) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		if fault, ok := r.(interface{ Addr() uintptr }); ok {
			err = fmt.Errorf("the file shrank or could not be read since it was opened (memory fault at %#x)", fault.Addr())
			return
		}
		panic(r)
	}()
	f()
	return nil
}

func (t *tensor) readError(err error) error {
	return fmt.Errorf("read tensor %q from %s: %w", t.info.Name, t.info.File, err)
}

func (t *tensor) dtypeError() error {
	return fmt.Errorf("read tensor %q from %s: dtype %s cannot be decoded as float32: %w",
		t.info.Name, t.info.File, t.info.DType, ErrUnsupportedDType)
}

// streamChunk is the size of the pieces ReadStored hands out: large enough
// that a write of each goes straight to the file, small enough to stay in
// cache between a check and the write.
const streamChunk = 4 << 20

// ReadStored calls fn with the stored bytes of the named tensor, in order,
// in chunks of whole elements; first is the flat index of a chunk's first
// element. A chunk is valid only during the call and must not be
// modified. An error from fn stops the reading and is returned as is.
//
// It is the way to copy a tensor without decoding it: on a memory-mapped
// file the chunks are views of the mapping, released from the resident set
// once passed, and a file that shrank since it was opened is reported as
// an error, not a crash.
func (c *Checkpoint) ReadStored(name string, fn func(chunk []byte, first int) error) error {
	t, err := c.lookup(name)
	if err != nil {
		return err
	}
	size, ok := dtypeSize(t.info.DType)
	if !ok || size == 0 {
		return t.dtypeError()
	}
	step := streamChunk / size * size
	if m := t.shard.mem; m != nil {
		data := m[t.off : t.off+t.info.Bytes]
		for at := int64(0); at < int64(len(data)); at += step {
			chunk := data[at:min(at+step, int64(len(data)))]
			var fnErr error
			if err := guardFault(func() { fnErr = fn(chunk, int(at/size)) }); err != nil {
				return t.readError(err)
			}
			if fnErr != nil {
				return fnErr
			}
			if t.shard.mapped {
				releaseMapped(m, t.off+at, int64(len(chunk)))
			}
		}
		return nil
	}
	buf := make([]byte, min(t.info.Bytes, step))
	for at := int64(0); at < t.info.Bytes; at += step {
		chunk := buf[:min(step, t.info.Bytes-at)]
		if err := t.shard.readAt(chunk, t.off+at); err != nil {
			return t.readError(err)
		}
		if err := fn(chunk, int(at/size)); err != nil {
			return err
		}
	}
	return nil
}
