// Package tokenizer loads Hugging Face tokenizer.json files and encodes and
// decodes text with the semantics of the HF tokenizers library, for BPE
// models of two families: byte-level BPE (GPT-2, Llama-3, Qwen2) and
// SentencePiece-style BPE with byte fallback (Llama-2, Mistral, llama2.c).
//
// Components outside those families make Load fail with an error naming
// the unsupported type. The truncation and padding settings of a file are
// ignored.
package tokenizer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

// Tokenizer encodes text into token ids and decodes ids into text. It is
// safe for concurrent use.
type Tokenizer struct {
	model      *bpe
	normalizer normalizer   // nil: text is used as is
	pre        preTokenizer // nil: each stretch of text is one word
	decoder    decoder      // nil: tokens are joined with spaces, as in HF
	post       template     // nil: Encode adds no special tokens

	addedIDs   map[string]int
	raw        *addedMatcher // added tokens matched before normalization
	normalized *addedMatcher // added tokens matched after it
	tokens     []vocabEntry  // by id
}

// vocabEntry is the token of an id.
type vocabEntry struct {
	text    string
	ok      bool // false for ids no token has
	special bool // the text is that of a special added token
}

// Load reads a Hugging Face tokenizer.json file.
func Load(path string) (*Tokenizer, error) {
	data, err := readTokenizerFile(path)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer: %w", err)
	}
	return Parse(path, data)
}

// maxFileSize bounds tokenizer.json; the largest real ones are tens of
// megabytes.
const maxFileSize = 512 << 20

// readTokenizerFile reads path, refusing what cannot be a tokenizer.json:
// a FIFO or device, which could block or never end, or a huge file.
func readTokenizerFile(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if fi.Size() > maxFileSize {
		return nil, fmt.Errorf("%s is %d bytes, over the %d-byte limit for a tokenizer", path, fi.Size(), maxFileSize)
	}
	return os.ReadFile(path)
}

// Parse is Load on bytes already in memory (name is used in error messages).
func Parse(name string, data []byte) (*Tokenizer, error) {
	t, err := parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return t, nil
}

func parse(data []byte) (*Tokenizer, error) {
	var file struct {
		AddedTokens   []addedToken    `json:"added_tokens"`
		Normalizer    json.RawMessage `json:"normalizer"`
		PreTokenizer  json.RawMessage `json:"pre_tokenizer"`
		Model         json.RawMessage `json:"model"`
		PostProcessor json.RawMessage `json:"post_processor"`
		Decoder       json.RawMessage `json:"decoder"`
	}
	if err := json.Unmarshal(data, &file); err != nil {
		return nil, fmt.Errorf("decode JSON: %w", err)
	}
	if isNull(file.Model) {
		return nil, fmt.Errorf("no model")
	}
	typ, err := modelType(file.Model)
	if err != nil {
		return nil, fmt.Errorf("model: %w", err)
	}
	if typ != "BPE" {
		return nil, fmt.Errorf("unsupported model type %q (supported: BPE)", typ)
	}
	t := &Tokenizer{addedIDs: make(map[string]int)}
	if t.model, err = parseBPE(file.Model); err != nil {
		return nil, err
	}
	if err := t.buildVocab(file.AddedTokens); err != nil {
		return nil, err
	}
	if !isNull(file.Normalizer) {
		if t.normalizer, err = parseNormalizer(file.Normalizer); err != nil {
			return nil, fmt.Errorf("normalizer: %w", err)
		}
	}
	if !isNull(file.PreTokenizer) {
		if t.pre, err = parsePreTokenizer(file.PreTokenizer); err != nil {
			return nil, fmt.Errorf("pre_tokenizer: %w", err)
		}
	}
	if !isNull(file.PostProcessor) {
		if t.post, err = parsePostProcessor(file.PostProcessor, len(t.tokens)); err != nil {
			return nil, fmt.Errorf("post_processor: %w", err)
		}
	}
	if !isNull(file.Decoder) {
		if t.decoder, err = parseDecoder(file.Decoder); err != nil {
			return nil, fmt.Errorf("decoder: %w", err)
		}
	}

	// Tokens marked normalized are matched in normalized text, so HF
	// normalizes their content too.
	var raw, norm []addedPattern
	for _, a := range file.AddedTokens {
		p := addedPattern{text: a.Content, tok: a}
		if !a.normalized() {
			raw = append(raw, p)
			continue
		}
		if t.normalizer != nil {
			p.text = t.normalizer.normalize(p.text)
		}
		norm = append(norm, p)
	}
	t.raw, t.normalized = newAddedMatcher(raw), newAddedMatcher(norm)
	return t, nil
}

// buildVocab fills the id table from the model's vocab and the added
// tokens. Ids must lie in [0, number of tokens) so that a corrupt file
// cannot make the table huge.
func (t *Tokenizer) buildVocab(added []addedToken) error {
	limit := len(t.model.vocab) + len(added)
	size := 0
	for tok, id := range t.model.vocab {
		if id < 0 || id >= limit {
			return fmt.Errorf("vocab token %q: id %d out of range [0, %d)", tok, id, limit)
		}
		size = max(size, id+1)
	}
	for _, a := range added {
		if a.ID < 0 || a.ID >= limit {
			return fmt.Errorf("added token %q: id %d out of range [0, %d)", a.Content, a.ID, limit)
		}
		if a.Content == "" {
			return fmt.Errorf("added token %d: empty content", a.ID)
		}
		size = max(size, a.ID+1)
	}
	t.tokens = make([]vocabEntry, size)
	for tok, id := range t.model.vocab {
		if prev := t.tokens[id]; prev.ok {
			a, b := min(prev.text, tok), max(prev.text, tok)
			return fmt.Errorf("vocab tokens %q and %q share id %d", a, b, id)
		}
		t.tokens[id] = vocabEntry{text: tok, ok: true}
	}
	// Added tokens take precedence over the model's, as in HF.
	special := make(map[string]bool)
	for _, a := range added {
		t.tokens[a.ID] = vocabEntry{text: a.Content, ok: true}
		t.addedIDs[a.Content] = a.ID
		if a.Special {
			special[a.Content] = true
		}
	}
	for i := range t.tokens {
		t.tokens[i].special = special[t.tokens[i].text]
	}
	return nil
}

// Encode tokenizes text. With addSpecial, the post-processor's special
// tokens (e.g. BOS) are added, as HF's encode(add_special_tokens=True).
//
// Invalid UTF-8 never panics: each invalid byte is treated as a character
// of its own (byte-level models encode the byte itself, byte fallback
// gives its <0xNN> token).
func (t *Tokenizer) Encode(text string, addSpecial bool) []int {
	var ids []int
	for _, seg := range t.raw.split(text) {
		if seg.id >= 0 {
			ids = append(ids, seg.id)
			continue
		}
		norm := seg.text
		if t.normalizer != nil {
			norm = t.normalizer.normalize(norm)
		}
		for _, sub := range t.normalized.split(norm) {
			if sub.id >= 0 {
				ids = append(ids, sub.id)
				continue
			}
			ids = t.encodeWords(ids, sub.text, seg.start == 0 && sub.start == 0)
		}
	}
	if addSpecial {
		ids = t.post.apply(ids)
	}
	return ids
}

// encodeWords pre-tokenizes a stretch of normalized text that holds no
// added token and appends the ids of its words.
func (t *Tokenizer) encodeWords(ids []int, text string, atStart bool) []int {
	words := []string{text}
	if t.pre != nil {
		words, _ = t.pre.preTokenize(words, atStart)
	}
	for _, w := range words {
		if w != "" {
			ids = t.model.appendIDs(ids, w)
		}
	}
	return ids
}

// Decode turns ids back into text; skipSpecial drops special tokens (HF
// skip_special_tokens). Ids without a token are skipped, as in HF.
func (t *Tokenizer) Decode(ids []int, skipSpecial bool) string {
	tokens := make([]string, 0, len(ids))
	for _, id := range ids {
		if id < 0 || id >= len(t.tokens) || !t.tokens[id].ok {
			continue
		}
		if e := t.tokens[id]; !skipSpecial || !e.special {
			tokens = append(tokens, e.text)
		}
	}
	if t.decoder == nil {
		return strings.Join(tokens, " ")
	}
	return strings.Join(t.decoder.decodeChain(tokens), "")
}

// VocabSize returns the largest id + 1 over vocab and added tokens.
func (t *Tokenizer) VocabSize() int { return len(t.tokens) }

// BOS returns the id the post-processor puts before the text, if it puts
// exactly one token there.
func (t *Tokenizer) BOS() (id int, ok bool) { return t.post.bos() }

// TokenID returns the id of a token, looking at added tokens first.
func (t *Tokenizer) TokenID(tok string) (int, bool) {
	if id, ok := t.addedIDs[tok]; ok {
		return id, true
	}
	id, ok := t.model.vocab[tok]
	return id, ok
}

// Token returns the token of an id.
func (t *Tokenizer) Token(id int) (string, bool) {
	if id < 0 || id >= len(t.tokens) || !t.tokens[id].ok {
		return "", false
	}
	return t.tokens[id].text, true
}

// IsSpecial reports whether id is a special added token, the kind Decode
// drops with skipSpecial.
func (t *Tokenizer) IsSpecial(id int) bool {
	return id >= 0 && id < len(t.tokens) && t.tokens[id].special
}

// isNull reports whether a component is absent or JSON null.
func isNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || bytes.Equal(raw, []byte("null"))
}

// componentType reads the "type" of a component object.
func componentType(raw json.RawMessage) (string, error) {
	var c struct {
		Type *string `json:"type"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return "", err
	}
	if c.Type == nil {
		return "", fmt.Errorf("component has no type")
	}
	return *c.Type, nil
}

// modelType reads the model's type. HF also accepts files whose BPE model
// omits it, so a typeless model with merges counts as BPE.
func modelType(raw json.RawMessage) (string, error) {
	var c struct {
		Type   *string         `json:"type"`
		Merges json.RawMessage `json:"merges"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return "", err
	}
	switch {
	case c.Type != nil:
		return *c.Type, nil
	case c.Merges != nil:
		return "BPE", nil
	}
	return "", fmt.Errorf("model has no type")
}

// patternJSON is an HF pattern: a literal string or a regular expression.
type patternJSON struct {
	String *string `json:"String"`
	Regex  *string `json:"Regex"`
}
