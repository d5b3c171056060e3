package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	st "github.com/nlpodyssey/safetensors"
)

// maxHeaderSize bounds the JSON header, as the reference implementation
// does, so a corrupt length field cannot make Open allocate gigabytes.
const maxHeaderSize = 100_000_000

// metadataKey is the reserved header key holding free-form string metadata.
const metadataKey = "__metadata__"

// parse reads and validates the header of s, filling s.meta and s.tensors.
// It reads through s.readAt only, so it works the same on a mapped file, an
// unmapped one, or a byte slice.
func (s *shard) parse() error {
	if s.size < 8 {
		return malformed(s.path, nil, "file is %d bytes, shorter than the 8-byte header length field", s.size)
	}
	var lenField [8]byte
	if err := s.readAt(lenField[:], 0); err != nil {
		return fmt.Errorf("read header length of %s: %w", s.path, err)
	}
	n := binary.LittleEndian.Uint64(lenField[:])
	if n > maxHeaderSize {
		return malformed(s.path, nil, "header length %d exceeds the %d-byte limit", n, maxHeaderSize)
	}
	if n > uint64(s.size-8) {
		return malformed(s.path, nil, "header length %d runs past the end of the %d-byte file", n, s.size)
	}
	hdr := make([]byte, n)
	if err := s.readAt(hdr, 8); err != nil {
		return fmt.Errorf("read header of %s: %w", s.path, err)
	}
	meta, tensors, err := parseHeader(s.path, hdr, s.size-8-int64(n))
	if err != nil {
		return err
	}
	for _, t := range tensors {
		t.shard = s
		t.off += 8 + int64(n)
	}
	s.meta, s.tensors = meta, tensors
	return nil
}

// parseHeader decodes and validates the JSON header hdr of file, whose data
// area holds dataLen bytes. It returns the metadata and the tensors in data
// order, with offsets relative to the data area.
func parseHeader(file string, hdr []byte, dataLen int64) (map[string]string, []*tensor, error) {
	raw, err := checkHeaderJSON(file, hdr)
	if err != nil {
		return nil, nil, err
	}
	// The library does the field decoding; the checks above and below exist
	// to give errors that name the file and tensor.
	var md st.Metadata
	if err := json.Unmarshal(hdr, &md); err != nil {
		return nil, nil, libraryError(file, raw, err)
	}
	infos := md.Tensors()
	tensors := make([]*tensor, 0, len(infos))
	for _, name := range sortedKeys(infos) {
		t, err := newTensor(file, name, infos[name], dataLen)
		if err != nil {
			return nil, nil, err
		}
		tensors = append(tensors, t)
	}
	slices.SortFunc(tensors, func(a, b *tensor) int {
		if c := compareOffsets(a, b); c != 0 {
			return c
		}
		return strings.Compare(a.info.Name, b.info.Name)
	})
	if err := checkLayout(file, tensors, dataLen); err != nil {
		return nil, nil, err
	}
	return md.Metadata(), tensors, nil
}

// checkHeaderJSON checks the shape of the header that the library would
// reject with messages naming neither the file nor the key: invalid UTF-8,
// invalid JSON, a non-object header, a non-object tensor entry, and
// non-string metadata values. It returns the header's top-level entries.
func checkHeaderJSON(file string, hdr []byte) (map[string]json.RawMessage, error) {
	// encoding/json would silently replace invalid UTF-8 in names; the
	// format requires valid UTF-8.
	if !utf8.Valid(hdr) {
		return nil, malformed(file, nil, "header is not valid UTF-8")
	}
	raw, err := decodeObject(hdr)
	if err != nil {
		return nil, malformed(file, err, "header is not a JSON object")
	}
	for _, name := range sortedKeys(raw) {
		v := raw[name]
		if name != metadataKey {
			if !isObject(v) {
				return nil, malformed(file, nil, "tensor %q: entry %s is not a JSON object", name, abbrev(v))
			}
			continue
		}
		if string(v) == "null" {
			continue
		}
		meta, err := decodeObject(v)
		if err != nil {
			return nil, malformed(file, err, "%s is not a JSON object", metadataKey)
		}
		for _, k := range sortedKeys(meta) {
			if meta[k][0] != '"' {
				return nil, malformed(file, nil, "%s key %q has non-string value %s", metadataKey, k, abbrev(meta[k]))
			}
		}
	}
	return raw, nil
}

// libraryError turns a failure of the library's header decoder into an
// error naming the file and one offending tensor. The library walks a Go
// map, so with several bad entries its choice varies from run to run;
// decoding each entry alone in name order makes the report deterministic.
func libraryError(file string, raw map[string]json.RawMessage, libErr error) error {
	for _, name := range sortedKeys(raw) {
		if name == metadataKey {
			continue
		}
		key, _ := json.Marshal(name) // a string always marshals
		one := append(append(append([]byte("{"), key...), ':'), raw[name]...)
		one = append(one, '}')
		var md st.Metadata
		if err := json.Unmarshal(one, &md); err != nil {
			if d := diagnoseEntry(raw[name]); d != "" {
				return malformed(file, nil, "tensor %q: %s", name, d)
			}
			return malformed(file, err, "invalid header entry") // the library names the tensor
		}
	}
	return malformed(file, libErr, "invalid header")
}

// diagnoseEntry describes what is wrong with a tensor entry the library
// rejected, in terms of the format rather than of Go types, or returns ""
// if it finds nothing.
func diagnoseEntry(entry json.RawMessage) string {
	var fields map[string]json.RawMessage
	if json.Unmarshal(entry, &fields) != nil {
		return ""
	}
	keys := sortedKeys(fields)
	if !slices.Equal(keys, []string{"data_offsets", "dtype", "shape"}) {
		return fmt.Sprintf("entry has keys %v, want [data_offsets dtype shape]", keys)
	}
	var dt string
	if json.Unmarshal(fields["dtype"], &dt) != nil {
		return fmt.Sprintf("dtype %s is not a string", abbrev(fields["dtype"]))
	}
	if _, err := st.ParseDType(dt); err != nil {
		return fmt.Sprintf("unknown dtype %q", dt)
	}
	if _, ok := naturals(fields["shape"]); !ok {
		return fmt.Sprintf("shape %s is not an array of non-negative integers", abbrev(fields["shape"]))
	}
	if n, ok := naturals(fields["data_offsets"]); !ok || n != 2 {
		return fmt.Sprintf("data_offsets %s is not a pair of non-negative integers", abbrev(fields["data_offsets"]))
	}
	return ""
}

// naturals reports whether v is a JSON array of integers in [0, 2⁶⁴), the
// values the library accepts, and returns its length.
func naturals(v json.RawMessage) (int, bool) {
	var elems []json.RawMessage
	if json.Unmarshal(v, &elems) != nil || elems == nil {
		return 0, false
	}
	for _, e := range elems {
		if _, err := strconv.ParseUint(string(e), 10, 64); err != nil {
			return 0, false
		}
	}
	return len(elems), true
}

// newTensor converts the library's description of a tensor, checking what
// the library leaves unchecked: that the size fits in int, that the offsets
// are ordered and inside the data area of dataLen bytes, and that they span
// exactly the shape's size.
func newTensor(file, name string, info *st.TensorInfo, dataLen int64) (*tensor, error) {
	size, _ := dtypeSize(info.DType) // the library only parses known dtypes
	// Bounding the byte size by MaxInt keeps every element count, offset
	// and slice length representable, also on 32-bit platforms.
	limit := uint64(math.MaxInt) / uint64(size)
	shape := make([]int, len(info.Shape))
	elems := uint64(1)
	for i, d := range info.Shape {
		if d > limit || (elems != 0 && d > limit/elems) {
			return nil, malformed(file, nil, "tensor %q: shape %v of %s overflows the addressable size", name, info.Shape, info.DType)
		}
		shape[i] = int(d)
		elems *= d
	}
	begin, end := info.DataOffsets[0], info.DataOffsets[1]
	if begin > end {
		return nil, malformed(file, nil, "tensor %q: data_offsets [%d %d]: begin is after end", name, begin, end)
	}
	if end > uint64(dataLen) {
		return nil, malformed(file, nil, "tensor %q: data_offsets [%d %d] out of range of the %d-byte data area",
			name, begin, end, dataLen)
	}
	nbytes := int64(elems) * size
	if uint64(nbytes) != end-begin {
		return nil, malformed(file, nil, "tensor %q: shape %v of %s needs %d bytes, data_offsets give %d",
			name, shape, info.DType, nbytes, end-begin)
	}
	return &tensor{
		info:  TensorInfo{Name: name, DType: info.DType, Shape: shape, File: file, Bytes: nbytes},
		elems: int(elems),
		off:   int64(begin),
	}, nil
}

// compareOffsets orders tensors by data_offsets.
func compareOffsets(a, b *tensor) int {
	if c := cmpInt64(a.off, b.off); c != 0 {
		return c
	}
	return cmpInt64(a.info.Bytes, b.info.Bytes)
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// checkLayout checks that tensors, each inside the data area and sorted by
// offset, tile the data area of dataLen bytes exactly: no overlap and, as
// the reference implementation requires, no holes or trailing bytes.
func checkLayout(file string, tensors []*tensor, dataLen int64) error {
	var prev *tensor
	pos := int64(0)
	for _, t := range tensors {
		switch {
		case t.off < pos:
			return malformed(file, nil, "tensors %q [%d %d] and %q [%d %d] overlap",
				prev.info.Name, prev.off, pos, t.info.Name, t.off, t.off+t.info.Bytes)
		case t.off > pos && prev == nil:
			return malformed(file, nil, "tensor %q: data starts at offset %d, leaving a %d-byte hole at the start of the data area",
				t.info.Name, t.off, t.off)
		case t.off > pos:
			return malformed(file, nil, "%d-byte hole between tensors %q (ends at %d) and %q (begins at %d)",
				t.off-pos, prev.info.Name, pos, t.info.Name, t.off)
		}
		prev, pos = t, t.off+t.info.Bytes
	}
	if pos != dataLen {
		if prev == nil {
			return malformed(file, nil, "data area holds %d bytes but the header lists no tensors", dataLen)
		}
		return malformed(file, nil, "%d unused bytes after tensor %q, which ends at %d of the %d-byte data area",
			dataLen-pos, prev.info.Name, pos, dataLen)
	}
	return nil
}

// decodeObject decodes a JSON object into its raw members. It fails for
// invalid JSON and for any other JSON value, including null.
func decodeObject(data []byte) (map[string]json.RawMessage, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return nil, fmt.Errorf("found a JSON %s", typeErr.Value)
		}
		return nil, err
	}
	if m == nil {
		return nil, errors.New("found null")
	}
	return m, nil
}

// isObject reports whether the raw JSON value v is an object. RawMessage
// values from encoding/json carry no surrounding whitespace.
func isObject(v json.RawMessage) bool {
	return len(v) > 0 && v[0] == '{'
}

// abbrev shortens a raw JSON value for an error message.
func abbrev(v json.RawMessage) string {
	const max = 40
	if len(v) <= max {
		return string(v)
	}
	return string(bytes.ToValidUTF8(v[:max], nil)) + "..."
}

// sortedKeys returns the keys of m in increasing order, for deterministic
// validation and error reports.
func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
