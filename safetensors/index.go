package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
)

// maxIndexSize bounds the shard index read into memory; real indexes are a
// few hundred kilobytes.
const maxIndexSize = maxHeaderSize

// shardIndex is the content of a model.safetensors.index.json.
type shardIndex struct {
	// weightMap maps each tensor name to its shard, a cleaned path
	// relative to the index's directory.
	weightMap map[string]string
	// shards lists the distinct shards in increasing order.
	shards []string
}

// parseIndex decodes and validates the shard index data read from file.
// Only weight_map is used; other members, such as metadata.total_size, are
// informational.
func parseIndex(file string, data []byte) (*shardIndex, error) {
	top, err := decodeObject(data)
	if err != nil {
		return nil, malformed(file, err, "index is not a JSON object")
	}
	rawMap, ok := top["weight_map"]
	if !ok {
		return nil, malformed(file, nil, "index has no weight_map")
	}
	entries, err := decodeObject(rawMap)
	if err != nil {
		return nil, malformed(file, err, "weight_map is not a JSON object")
	}
	idx := &shardIndex{weightMap: make(map[string]string, len(entries))}
	seen := make(map[string]bool)
	for _, name := range sortedKeys(entries) {
		var shard string
		if err := json.Unmarshal(entries[name], &shard); err != nil {
			return nil, malformed(file, nil, "weight_map entry for tensor %q: %s is not a string", name, abbrev(entries[name]))
		}
		// Shards must live under the index's directory: an index from an
		// untrusted download must not make Open read arbitrary files.
		p := filepath.FromSlash(shard)
		if !filepath.IsLocal(p) || filepath.Clean(p) == "." {
			return nil, malformed(file, nil, "weight_map entry for tensor %q: shard path %q is not a file inside the checkpoint directory", name, shard)
		}
		p = filepath.Clean(p)
		idx.weightMap[name] = p
		if !seen[p] {
			seen[p] = true
			idx.shards = append(idx.shards, p)
		}
	}
	slices.Sort(idx.shards)
	return idx, nil
}

// openIndex opens the sharded checkpoint described by the index at path.
func (o opener) openIndex(path string) (*Checkpoint, error) {
	data, err := readIndex(path)
	if err != nil {
		return nil, err
	}
	return o.openIndexData(path, data)
}

// openIndexData opens the sharded checkpoint described by data, the content
// of the index file at path.
func (o opener) openIndexData(path string, data []byte) (*Checkpoint, error) {
	idx, err := parseIndex(path, data)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	shards := make([]*shard, 0, len(idx.shards))
	closeAll := func() {
		for _, s := range shards {
			s.close()
		}
	}
	for _, name := range idx.shards {
		s, err := o.openShard(filepath.Join(dir, name))
		if err != nil {
			closeAll()
			if errors.Is(err, ErrMalformed) {
				return nil, err // already names the shard and tensor
			}
			// An index listing a shard that cannot be opened (missing,
			// or a path through a regular file, say) describes no usable
			// checkpoint; the cause stays available to errors.Is.
			return nil, malformed(path, err, "shard %s (listed for tensor %q)", name, idx.firstTensor(name))
		}
		shards = append(shards, s)
	}
	if err := idx.check(path, dir, shards); err != nil {
		closeAll()
		return nil, err
	}
	return newCheckpoint(path, shards), nil
}

// readIndex reads the index file at path, refusing implausibly large ones.
func readIndex(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open checkpoint: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("open checkpoint: %w", err)
	}
	if fi.Size() > maxIndexSize {
		return nil, malformed(path, nil, "index is %d bytes, over the %d-byte limit", fi.Size(), maxIndexSize)
	}
	data := make([]byte, fi.Size())
	if _, err := f.ReadAt(data, 0); err != nil {
		return nil, fmt.Errorf("open checkpoint %s: %w", path, err)
	}
	return data, nil
}

// firstTensor returns the first tensor, in name order, that idx assigns to
// shard, for error messages.
func (idx *shardIndex) firstTensor(shard string) string {
	for _, name := range sortedKeys(idx.weightMap) {
		if idx.weightMap[name] == shard {
			return name
		}
	}
	return ""
}

// check verifies that the opened shards hold exactly the tensors idx
// assigns them: each tensor in one shard only, in the shard the index
// names, and none unlisted.
func (idx *shardIndex) check(indexPath, dir string, shards []*shard) error {
	found := make(map[string]*shard)
	for _, s := range shards {
		for _, t := range s.tensors {
			if other, ok := found[t.info.Name]; ok {
				return malformed(indexPath, nil, "tensor %q is stored in both %s and %s", t.info.Name, other.path, s.path)
			}
			found[t.info.Name] = s
		}
	}
	for _, name := range sortedKeys(idx.weightMap) {
		listed := filepath.Join(dir, idx.weightMap[name])
		s, ok := found[name]
		switch {
		case !ok:
			return malformed(indexPath, nil, "tensor %q is listed in weight_map for %s but missing from it", name, listed)
		case s.path != listed:
			return malformed(indexPath, nil, "tensor %q is listed in weight_map for %s but stored in %s", name, listed, s.path)
		}
	}
	for _, name := range sortedKeys(found) {
		if _, ok := idx.weightMap[name]; !ok {
			return malformed(indexPath, nil, "tensor %q in %s is not listed in weight_map", name, found[name].path)
		}
	}
	return nil
}
