package tokenizer

import (
	"encoding/json"
	"fmt"
)

// ByteLevelJSON returns a tokenizer.json for a byte-level BPE with no
// merges: ids 0..255 are the bytes, then one special token per name. It is
// the tokenizer of the project's synthetic checkpoints, and loads in Hugging
// Face tokenizers as well as here.
func ByteLevelJSON(specials ...string) ([]byte, error) {
	t := byteLevelTables()
	vocab := make(map[string]int, 256+len(specials))
	for b := range 256 {
		vocab[string(t.toRune[b])] = b
	}
	type added struct {
		ID         int    `json:"id"`
		Content    string `json:"content"`
		SingleWord bool   `json:"single_word"`
		LStrip     bool   `json:"lstrip"`
		RStrip     bool   `json:"rstrip"`
		Normalized bool   `json:"normalized"`
		Special    bool   `json:"special"`
	}
	addedTokens := make([]added, 0, len(specials))
	for i, s := range specials {
		if _, dup := vocab[s]; dup {
			return nil, fmt.Errorf("byte-level tokenizer: special token %q collides with a byte token", s)
		}
		vocab[s] = 256 + i
		addedTokens = append(addedTokens, added{ID: 256 + i, Content: s, Special: true})
	}
	byteLevel := map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
	doc := map[string]any{
		"version":        "1.0",
		"truncation":     nil,
		"padding":        nil,
		"added_tokens":   addedTokens,
		"normalizer":     nil,
		"pre_tokenizer":  byteLevel,
		"post_processor": byteLevel,
		"decoder":        byteLevel,
		"model": map[string]any{
			"type": "BPE", "dropout": nil, "unk_token": nil, "continuing_subword_prefix": nil,
			"end_of_word_suffix": nil, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
			"vocab": vocab, "merges": []string{},
		},
	}
	return json.MarshalIndent(doc, "", "  ")
}
