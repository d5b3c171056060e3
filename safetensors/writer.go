package safetensors

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"unicode/utf8"
)

// TensorSpec describes one tensor for WriteCheckpoint.
type TensorSpec struct {
	Name  string
	DType DType
	Shape []int // empty for a scalar
	// Write writes the tensor's data, little-endian in row-major order, to
	// w. WriteCheckpoint calls it exactly once, and fails unless it writes
	// exactly Bytes() bytes.
	Write func(w io.Writer) error
}

// Bytes returns the stored size of the tensor: its element count times the
// dtype size. It returns -1 if the dtype is invalid, a dimension is
// negative, or the size overflows int64.
func (s TensorSpec) Bytes() int64 {
	size, ok := dtypeSize(s.DType)
	if !ok {
		return -1
	}
	n := size
	for _, d := range s.Shape {
		if d < 0 || (d > 0 && n > math.MaxInt64/int64(d)) {
			return -1
		}
		n *= int64(d)
	}
	return n
}

// Float32Tensor returns a spec that writes data as dtype dt, which must be
// BF16, F16, F32 or F64, rounding to nearest with ties to even. It encodes
// in small chunks while writing, so no encoded copy of the whole tensor is
// held. Its Write fails if len(data) does not match shape.
func Float32Tensor(name string, dt DType, shape []int, data []float32) TensorSpec {
	shape = slices.Clone(shape)
	return TensorSpec{Name: name, DType: dt, Shape: shape, Write: func(w io.Writer) error {
		if !encodable(dt) {
			return fmt.Errorf("encode float32 as %s: %w", dtypeName(dt), ErrUnsupportedDType)
		}
		size, _ := dtypeSize(dt)
		if n := (TensorSpec{DType: dt, Shape: shape}).Bytes() / size; n != int64(len(data)) {
			return fmt.Errorf("%d values given for shape %v: %w", len(data), shape, ErrLength)
		}
		const chunk = 1 << 16 // elements per encode-and-write step
		buf := make([]byte, int64(min(len(data), chunk))*size)
		for i := 0; i < len(data); i += chunk {
			part := data[i:min(i+chunk, len(data))]
			b := buf[:int64(len(part))*size]
			EncodeFloat32(b, part, dt)
			if _, err := w.Write(b); err != nil {
				return err
			}
		}
		return nil
	}}
}

// WriteOptions controls WriteCheckpoint.
type WriteOptions struct {
	// MaxShardBytes caps the tensor bytes per file; 0 writes a single
	// file. A tensor larger than the cap gets a file of its own. When all
	// tensors fit in one file, it is written unsharded, without an index,
	// as Hugging Face does.
	MaxShardBytes int64
	// Metadata is stored as __metadata__ in every file when non-empty.
	Metadata map[string]string
	// Prefix names the files; the default is "model".
	Prefix string
}

// WriteCheckpoint writes specs, in the order given, into the existing
// directory dir: as PREFIX.safetensors, or, when MaxShardBytes splits them
// over several files, as PREFIX-00001-of-0000N.safetensors and so on plus a
// PREFIX.safetensors.index.json in the Hugging Face layout.
//
// Offsets are planned before any data is written, then each tensor is
// streamed from its Write function. Every file is written to a temporary
// file in dir and renamed into place only when all are complete, the index
// last, so on error no file with a final name is left behind. Cancelling
// ctx stops the write between tensors. An unsharded write removes a
// PREFIX.safetensors.index.json left in dir by an earlier sharded one,
// which Open would otherwise prefer; stale shard files are left alone.
func WriteCheckpoint(ctx context.Context, dir string, specs []TensorSpec, opts WriteOptions) error {
	w, err := newCheckpointWriter(dir, specs, opts)
	if err != nil {
		return fmt.Errorf("write checkpoint %s: %w", dir, err)
	}
	if err := w.write(ctx); err != nil {
		w.removeTemps()
		return err
	}
	return w.commit()
}

// checkpointWriter holds the plan of one WriteCheckpoint call.
type checkpointWriter struct {
	dir   string
	files []plannedFile
	index []byte // content of the index file, or nil when not sharded
	// indexName is the final index path, also when not sharded, to remove
	// a stale index; indexTemp is the temporary one while writing.
	indexName, indexTemp string
}

// plannedFile is one output file.
type plannedFile struct {
	name   string // final path
	temp   string // temporary path while writing, "" before
	header []byte // length field, JSON header and padding
	specs  []TensorSpec
}

// newCheckpointWriter validates the arguments and plans the files.
func newCheckpointWriter(dir string, specs []TensorSpec, opts WriteOptions) (*checkpointWriter, error) {
	prefix := opts.Prefix
	if prefix == "" {
		prefix = defaultPrefix
	}
	if filepath.Base(prefix) != prefix || !filepath.IsLocal(prefix) {
		return nil, fmt.Errorf("prefix %q is not a plain file name", prefix)
	}
	if opts.MaxShardBytes < 0 {
		return nil, fmt.Errorf("negative MaxShardBytes %d", opts.MaxShardBytes)
	}
	for k, v := range opts.Metadata {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return nil, fmt.Errorf("metadata %q: not valid UTF-8", k)
		}
	}
	if fi, err := os.Stat(dir); err != nil {
		return nil, err
	} else if !fi.IsDir() {
		return nil, errors.New("not a directory")
	}
	sizes, err := checkSpecs(specs)
	if err != nil {
		return nil, err
	}

	groups := planShards(sizes, opts.MaxShardBytes)
	w := &checkpointWriter{dir: dir}
	weightMap := make(map[string]string, len(specs))
	var total int64
	for i, g := range groups {
		name := prefix + singleSuffix
		if len(groups) > 1 {
			name = fmt.Sprintf("%s-%05d-of-%05d%s", prefix, i+1, len(groups), singleSuffix)
		}
		group := specs[g[0]:g[1]]
		header, err := buildHeader(group, sizes[g[0]:g[1]], opts.Metadata)
		if err != nil {
			return nil, err
		}
		w.files = append(w.files, plannedFile{name: filepath.Join(dir, name), header: header, specs: group})
		for j, s := range group {
			weightMap[s.Name] = name
			total += sizes[g[0]+j]
		}
	}
	w.indexName = filepath.Join(dir, prefix+indexSuffix)
	if len(groups) > 1 {
		w.index, err = buildIndex(weightMap, total)
		if err != nil {
			return nil, err
		}
	}
	return w, nil
}

// checkSpecs validates specs and returns their sizes in bytes.
func checkSpecs(specs []TensorSpec) ([]int64, error) {
	sizes := make([]int64, len(specs))
	var total int64
	seen := make(map[string]bool, len(specs))
	for i, s := range specs {
		switch {
		case s.Name == "" || s.Name == metadataKey || !utf8.ValidString(s.Name):
			return nil, fmt.Errorf("invalid tensor name %q", s.Name)
		case seen[s.Name]:
			return nil, fmt.Errorf("tensor %q given twice", s.Name)
		case s.Write == nil:
			return nil, fmt.Errorf("tensor %q has no Write function", s.Name)
		}
		seen[s.Name] = true
		if _, ok := dtypeSize(s.DType); !ok {
			return nil, fmt.Errorf("tensor %q: invalid dtype %s", s.Name, dtypeName(s.DType))
		}
		if sizes[i] = s.Bytes(); sizes[i] < 0 {
			return nil, fmt.Errorf("tensor %q: invalid shape %v", s.Name, s.Shape)
		}
		// Offsets within a file and total_size must stay representable.
		if total > math.MaxInt64-sizes[i] {
			return nil, fmt.Errorf("tensor %q: total size overflows int64", s.Name)
		}
		total += sizes[i]
	}
	return sizes, nil
}

// planShards splits tensors of the given sizes, in order, into runs
// [begin, end) of at most maxBytes each (a larger tensor alone), or one run
// when maxBytes is 0. There is always at least one run, so that an empty
// checkpoint is still written as a valid file.
func planShards(sizes []int64, maxBytes int64) [][2]int {
	groups := [][2]int{{0, 0}}
	var used int64
	for i, n := range sizes {
		last := &groups[len(groups)-1]
		if maxBytes > 0 && last[1] > last[0] && used+n > maxBytes {
			groups = append(groups, [2]int{i, i})
			last, used = &groups[len(groups)-1], 0
		}
		last[1] = i + 1
		used += n
	}
	return groups
}

// buildHeader returns the length field and JSON header, padded with spaces
// to a multiple of 8 bytes so that the data area starts aligned, for specs
// of the given sizes in order. Like current versions of the reference
// implementation it puts __metadata__ first and writes no whitespace, so
// that rewriting such a file tensor by tensor reproduces it byte for byte.
func buildHeader(specs []TensorSpec, sizes []int64, meta map[string]string) ([]byte, error) {
	b := make([]byte, 8, 8+64*len(specs))
	b = append(b, '{')
	if len(meta) > 0 {
		b = appendJSONString(b, metadataKey)
		b = append(b, ":{"...)
		for i, k := range sortedKeys(meta) {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, k)
			b = append(b, ':')
			b = appendJSONString(b, meta[k])
		}
		b = append(b, '}')
	}
	var off int64
	for i, s := range specs {
		if i > 0 || len(meta) > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, s.Name)
		b = append(b, `:{"dtype":"`...)
		b = append(b, s.DType.String()...)
		b = append(b, `","shape":[`...)
		for j, d := range s.Shape {
			if j > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendInt(b, int64(d), 10)
		}
		b = append(b, `],"data_offsets":[`...)
		b = strconv.AppendInt(b, off, 10)
		b = append(b, ',')
		off += sizes[i]
		b = strconv.AppendInt(b, off, 10)
		b = append(b, "]}"...)
	}
	b = append(b, '}')
	for len(b)%8 != 0 {
		b = append(b, ' ')
	}
	n := len(b) - 8
	if n > maxHeaderSize {
		return nil, fmt.Errorf("header of %d bytes exceeds the %d-byte limit", n, maxHeaderSize)
	}
	binary.LittleEndian.PutUint64(b, uint64(n))
	return b, nil
}

// appendJSONString appends s, which must be valid UTF-8, as a JSON string.
func appendJSONString(b []byte, s string) []byte {
	q, _ := json.Marshal(s) // a string always marshals
	return append(b, q...)
}

// buildIndex returns the index file content as Hugging Face writes it:
// indented, keys sorted, metadata.total_size and weight_map.
func buildIndex(weightMap map[string]string, total int64) ([]byte, error) {
	type metadata struct {
		TotalSize int64 `json:"total_size"`
	}
	idx := struct {
		Metadata  metadata          `json:"metadata"`
		WeightMap map[string]string `json:"weight_map"`
	}{metadata{total}, weightMap}
	b, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// write writes every planned file, and the index, to temporary files.
func (w *checkpointWriter) write(ctx context.Context) error {
	for i := range w.files {
		if err := w.files[i].write(ctx, w.dir); err != nil {
			return err
		}
	}
	if w.index == nil {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("write checkpoint %s: %w", w.indexName, err)
	}
	f, err := createTemp(w.dir, w.indexName)
	if err != nil {
		return err
	}
	w.indexTemp = f.Name()
	if _, err := f.Write(w.index); err != nil {
		f.Close()
		return fmt.Errorf("write checkpoint %s: %w", w.indexName, err)
	}
	if err := finish(f); err != nil {
		return fmt.Errorf("write checkpoint %s: %w", w.indexName, err)
	}
	return nil
}

// write streams the header and tensors of p into a new temporary file in
// dir, recording its name in p.temp.
func (p *plannedFile) write(ctx context.Context, dir string) error {
	f, err := createTemp(dir, p.name)
	if err != nil {
		return err
	}
	p.temp = f.Name()
	bw := bufio.NewWriterSize(f, 1<<20)
	if _, err := bw.Write(p.header); err != nil {
		f.Close()
		return fmt.Errorf("write checkpoint %s: %w", p.name, err)
	}
	for _, s := range p.specs {
		if err := ctx.Err(); err != nil {
			f.Close()
			return fmt.Errorf("write checkpoint %s: %w", p.name, err)
		}
		if err := writeTensor(bw, s); err != nil {
			f.Close()
			return fmt.Errorf("write checkpoint %s: tensor %q: %w", p.name, s.Name, err)
		}
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("write checkpoint %s: %w", p.name, err)
	}
	if err := finish(f); err != nil {
		return fmt.Errorf("write checkpoint %s: %w", p.name, err)
	}
	return nil
}

// writeTensor calls s.Write and checks that it wrote exactly s.Bytes().
func writeTensor(w io.Writer, s TensorSpec) error {
	want := s.Bytes()
	lw := &limitWriter{w: w, left: want}
	err := s.Write(lw)
	switch {
	case lw.over:
		return fmt.Errorf("the Write function produced more than the %d bytes of shape %v of %s: %w", want, s.Shape, s.DType, ErrLength)
	case err != nil:
		return err
	case lw.left != 0:
		return fmt.Errorf("the Write function produced %d bytes, shape %v of %s needs %d: %w", want-lw.left, s.Shape, s.DType, want, ErrLength)
	}
	return nil
}

// limitWriter passes at most left bytes to w, and records an attempt to
// write more, which would shift every later tensor, even if the caller
// ignores the error.
type limitWriter struct {
	w    io.Writer
	left int64
	over bool
}

func (lw *limitWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > lw.left {
		lw.over = true
		return 0, fmt.Errorf("write past the tensor's size: %w", ErrLength)
	}
	n, err := lw.w.Write(p)
	lw.left -= int64(n)
	return n, err
}

// createTemp creates a temporary file in dir for the final path name. The
// leading dot keeps it out of casual listings and globs for *.safetensors.
func createTemp(dir, name string) (*os.File, error) {
	f, err := os.CreateTemp(dir, "."+filepath.Base(name)+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("write checkpoint %s: %w", name, err)
	}
	return f, nil
}

// finish makes the completely written f world-readable like a normally
// created file (CreateTemp uses mode 0600), flushes it to stable storage so
// the rename cannot expose a file whose data was lost in a crash, and
// closes it.
func finish(f *os.File) error {
	err := f.Chmod(0o644)
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

// commit renames the temporary files into place, the index last so that a
// reader never finds an index whose shards are still missing. If a rename
// fails it removes what it had renamed and the remaining temporary files.
func (w *checkpointWriter) commit() error {
	var done []string
	rename := func(temp, name string) error {
		if err := os.Rename(temp, name); err != nil {
			for _, d := range done {
				os.Remove(d)
			}
			w.removeTemps()
			return fmt.Errorf("write checkpoint %s: %w", name, err)
		}
		done = append(done, name)
		return nil
	}
	for _, f := range w.files {
		if err := rename(f.temp, f.name); err != nil {
			return err
		}
	}
	if w.index != nil {
		return rename(w.indexTemp, w.indexName)
	}
	// Open prefers an index to a single file, so an index left from an
	// earlier sharded write would hide the file just written.
	if err := os.Remove(w.indexName); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("write checkpoint %s: remove stale index: %w", w.files[0].name, err)
	}
	return nil
}

// removeTemps deletes the temporary files that still exist.
func (w *checkpointWriter) removeTemps() {
	for _, f := range w.files {
		if f.temp != "" {
			os.Remove(f.temp)
		}
	}
	if w.indexTemp != "" {
		os.Remove(w.indexTemp)
	}
}
