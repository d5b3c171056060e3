package tokenizer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"
)

// Cache bounds: HF caches words shorter than 256 bytes; the entry limit
// keeps memory bounded on endless streams of distinct words.
const (
	maxCachedWordLen = 256
	maxCacheEntries  = 1 << 16
)

// bpe is HF's BPE model: a word is cut into characters, which are merged
// pairwise, lowest merge rank first.
type bpe struct {
	vocab        map[string]int
	merges       map[[2]int]mergeRule
	unk          int // id of unk_token, -1 without one
	fuseUnk      bool
	byteFallback bool
	ignoreMerges bool
	byteIDs      [256]int // ids of "<0x00>".."<0xFF>", -1 where absent

	cache wordCache
}

// mergeRule is what a pair of adjacent tokens merges into, and the merge's
// rank (its position in the merges list).
type mergeRule struct {
	rank, id int
}

func parseBPE(raw json.RawMessage) (*bpe, error) {
	var c struct {
		Dropout                 *float64          `json:"dropout"`
		UnkToken                *string           `json:"unk_token"`
		ContinuingSubwordPrefix *string           `json:"continuing_subword_prefix"`
		EndOfWordSuffix         *string           `json:"end_of_word_suffix"`
		FuseUnk                 bool              `json:"fuse_unk"`
		ByteFallback            bool              `json:"byte_fallback"`
		IgnoreMerges            bool              `json:"ignore_merges"`
		Vocab                   map[string]int    `json:"vocab"`
		Merges                  []json.RawMessage `json:"merges"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, fmt.Errorf("BPE model: %w", err)
	}
	// Dropout makes HF's encoding random; the affixes serve WordPiece-like
	// vocabularies outside the two families this package handles.
	if c.Dropout != nil && *c.Dropout != 0 {
		return nil, fmt.Errorf("BPE model: dropout %v is not supported", *c.Dropout)
	}
	if c.ContinuingSubwordPrefix != nil && *c.ContinuingSubwordPrefix != "" {
		return nil, fmt.Errorf("BPE model: continuing_subword_prefix %q is not supported", *c.ContinuingSubwordPrefix)
	}
	if c.EndOfWordSuffix != nil && *c.EndOfWordSuffix != "" {
		return nil, fmt.Errorf("BPE model: end_of_word_suffix %q is not supported", *c.EndOfWordSuffix)
	}
	if c.Vocab == nil {
		return nil, fmt.Errorf("BPE model: no vocab")
	}
	m := &bpe{
		vocab:        c.Vocab,
		merges:       make(map[[2]int]mergeRule, len(c.Merges)),
		unk:          -1,
		fuseUnk:      c.FuseUnk,
		byteFallback: c.ByteFallback,
		ignoreMerges: c.IgnoreMerges,
		cache:        wordCache{m: make(map[string][]int)},
	}
	if c.UnkToken != nil {
		id, ok := c.Vocab[*c.UnkToken]
		if !ok {
			return nil, fmt.Errorf("BPE model: unk_token %q not in vocab", *c.UnkToken)
		}
		m.unk = id
	}
	for b := range m.byteIDs {
		id, ok := c.Vocab[fmt.Sprintf("<0x%02X>", b)]
		if !ok {
			id = -1
		}
		m.byteIDs[b] = id
	}
	for rank, r := range c.Merges {
		left, right, err := parseMerge(r)
		if err != nil {
			return nil, fmt.Errorf("BPE model: merge %d: %w", rank, err)
		}
		for _, tok := range [...]string{left, right, left + right} {
			if _, ok := c.Vocab[tok]; !ok {
				return nil, fmt.Errorf("BPE model: merge %d (%q %q): token %q not in vocab", rank, left, right, tok)
			}
		}
		// A repeated pair keeps its last rank, as HF's map insertion does.
		m.merges[[2]int{c.Vocab[left], c.Vocab[right]}] = mergeRule{rank: rank, id: c.Vocab[left+right]}
	}
	return m, nil
}

// parseMerge reads a merge written either as "left right" or as
// ["left", "right"].
func parseMerge(raw json.RawMessage) (left, right string, err error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		parts := strings.Split(s, " ")
		if len(parts) != 2 {
			return "", "", fmt.Errorf("%q is not two tokens separated by one space", s)
		}
		return parts[0], parts[1], nil
	}
	var pair []string
	if err := json.Unmarshal(raw, &pair); err != nil || len(pair) != 2 {
		// Compacted, the entry prints on one line; it is one element of a
		// decoded array, so valid JSON.
		var one bytes.Buffer
		json.Compact(&one, raw)
		return "", "", fmt.Errorf("%s is neither \"left right\" nor [\"left\", \"right\"]", one.Bytes())
	}
	return pair[0], pair[1], nil
}

// appendIDs appends the ids of one pre-tokenized word to dst.
func (m *bpe) appendIDs(dst []int, word string) []int {
	if m.ignoreMerges {
		if id, ok := m.vocab[word]; ok {
			return append(dst, id)
		}
	}
	if ids, ok := m.cache.get(word); ok {
		return append(dst, ids...)
	}
	ids := m.merge(m.symbols(word))
	if len(word) < maxCachedWordLen {
		m.cache.put(strings.Clone(word), ids)
	}
	return append(dst, ids...)
}

// symbol is a token of a word being merged, linked to its neighbours by
// index (-1 at the ends). Merged-away symbols have id -1.
type symbol struct {
	id, prev, next int
}

// symbols cuts word into its initial tokens: one per character, or the
// character's byte tokens with byte fallback, or the unknown token (runs
// of unknown characters fused into one with fuseUnk). Characters with no
// representation at all are dropped, as in HF. An invalid UTF-8 byte
// counts as a character of its own.
func (m *bpe) symbols(word string) []symbol {
	syms := make([]symbol, 0, len(word))
	add := func(id int) {
		n := len(syms)
		syms = append(syms, symbol{id: id, prev: n - 1, next: n + 1})
	}
	unkPending := false
	for i := 0; i < len(word); {
		_, w := utf8.DecodeRuneInString(word[i:])
		ch := word[i : i+w]
		i += w
		if id, ok := m.vocab[ch]; ok {
			if unkPending {
				add(m.unk)
				unkPending = false
			}
			add(id)
			continue
		}
		if m.byteFallback && m.hasByteTokens(ch) {
			// HF emits byte tokens without first flushing a pending
			// unknown token; keep that order.
			for j := 0; j < len(ch); j++ {
				add(m.byteIDs[ch[j]])
			}
			continue
		}
		if m.unk >= 0 {
			if unkPending && !m.fuseUnk {
				add(m.unk)
			}
			unkPending = true
		}
	}
	if unkPending {
		add(m.unk)
	}
	if len(syms) > 0 {
		syms[len(syms)-1].next = -1
	}
	return syms
}

func (m *bpe) hasByteTokens(ch string) bool {
	for i := 0; i < len(ch); i++ {
		if m.byteIDs[ch[i]] < 0 {
			return false
		}
	}
	return true
}

// merge applies merges to syms, always the lowest rank first and, among
// equal ranks, the leftmost, and returns the resulting ids. A heap keeps
// this O(n log n) for long words: SentencePiece-style tokenizers without a
// pre-tokenizer hand the model whole texts.
func (m *bpe) merge(syms []symbol) []int {
	if len(syms) == 0 {
		return nil
	}
	var q mergeQueue
	for i := 0; i+1 < len(syms); i++ {
		if r, ok := m.merges[[2]int{syms[i].id, syms[i+1].id}]; ok {
			q.push(mergeCand{rank: r.rank, pos: i, id: r.id})
		}
	}
	for len(q) > 0 {
		c := q.pop()
		s := &syms[c.pos]
		if s.id < 0 || s.next < 0 {
			continue
		}
		right := &syms[s.next]
		// Skip candidates made stale by earlier merges.
		if r, ok := m.merges[[2]int{s.id, right.id}]; !ok || r.id != c.id {
			continue
		}
		s.id = c.id
		s.next = right.next
		right.id = -1
		if s.next >= 0 {
			syms[s.next].prev = c.pos
			if r, ok := m.merges[[2]int{s.id, syms[s.next].id}]; ok {
				q.push(mergeCand{rank: r.rank, pos: c.pos, id: r.id})
			}
		}
		if s.prev >= 0 {
			if r, ok := m.merges[[2]int{syms[s.prev].id, s.id}]; ok {
				q.push(mergeCand{rank: r.rank, pos: s.prev, id: r.id})
			}
		}
	}
	var ids []int
	for i := 0; i >= 0; i = syms[i].next {
		ids = append(ids, syms[i].id)
	}
	return ids
}

// mergeCand proposes merging the symbol at pos with its right neighbour
// into id.
type mergeCand struct {
	rank, pos, id int
}

func (a mergeCand) less(b mergeCand) bool {
	if a.rank != b.rank {
		return a.rank < b.rank
	}
	return a.pos < b.pos
}

// mergeQueue is a binary min-heap of candidates.
type mergeQueue []mergeCand

func (q *mergeQueue) push(c mergeCand) {
	*q = append(*q, c)
	h := *q
	for i := len(h) - 1; i > 0; {
		parent := (i - 1) / 2
		if !h[i].less(h[parent]) {
			break
		}
		h[i], h[parent] = h[parent], h[i]
		i = parent
	}
}

func (q *mergeQueue) pop() mergeCand {
	h := *q
	top := h[0]
	last := len(h) - 1
	h[0] = h[last]
	h = h[:last]
	for i := 0; ; {
		small, l, r := i, 2*i+1, 2*i+2
		if l < len(h) && h[l].less(h[small]) {
			small = l
		}
		if r < len(h) && h[r].less(h[small]) {
			small = r
		}
		if small == i {
			break
		}
		h[i], h[small] = h[small], h[i]
		i = small
	}
	*q = h
	return top
}

// wordCache remembers the ids of recently seen words. It is safe for
// concurrent use; its slices must not be modified.
type wordCache struct {
	mu sync.RWMutex
	m  map[string][]int
}

func (c *wordCache) get(word string) ([]int, bool) {
	c.mu.RLock()
	ids, ok := c.m[word]
	c.mu.RUnlock()
	return ids, ok
}

func (c *wordCache) put(word string, ids []int) {
	c.mu.Lock()
	if len(c.m) >= maxCacheEntries {
		clear(c.m)
	}
	c.m[word] = ids
	c.mu.Unlock()
}
