package tokenizer

import (
	"encoding/json"
	"fmt"
	"testing"
)

// spec describes a small tokenizer.json for tests. Token ids are positions
// in vocab; merges are listed as pairs and their results are appended to
// the vocab when missing.
type spec struct {
	vocab      []string
	merges     [][2]string
	model      map[string]any // extra BPE fields
	added      []map[string]any
	normalizer any
	pre        any
	post       any
	decoder    any
}

func (s spec) json(tb testing.TB) []byte {
	tb.Helper()
	vocab := map[string]int{}
	add := func(tok string) {
		if _, ok := vocab[tok]; !ok {
			vocab[tok] = len(vocab)
		}
	}
	for _, tok := range s.vocab {
		add(tok)
	}
	merges := make([]any, len(s.merges))
	for i, m := range s.merges {
		add(m[0] + m[1])
		merges[i] = []string{m[0], m[1]}
	}
	model := map[string]any{"type": "BPE", "vocab": vocab, "merges": merges}
	for k, v := range s.model {
		model[k] = v
	}
	data, err := json.Marshal(map[string]any{
		"version":        "1.0",
		"added_tokens":   s.added,
		"normalizer":     s.normalizer,
		"pre_tokenizer":  s.pre,
		"model":          model,
		"post_processor": s.post,
		"decoder":        s.decoder,
	})
	if err != nil {
		tb.Fatal(err)
	}
	return data
}

func (s spec) build(tb testing.TB) *Tokenizer {
	tb.Helper()
	tok, err := Parse("test.json", s.json(tb))
	if err != nil {
		tb.Fatal(err)
	}
	return tok
}

// byteAlphabet returns GPT-2's 256 byte tokens in byte order.
func byteAlphabet() []string {
	t := byteLevelTables()
	out := make([]string, 256)
	for b := range out {
		out[b] = string(t.toRune[b])
	}
	return out
}

// byteLevelSpec is a GPT-2 style tokenizer: byte tokens 0..255, a few
// merges, and <|endoftext|> (id 256) as a special added token.
func byteLevelSpec() spec {
	return spec{
		vocab: append(byteAlphabet(), "<|endoftext|>"),
		merges: [][2]string{
			{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"},
			{"Ġ", "w"}, {"o", "r"}, {"Ġw", "or"}, {"Ġwor", "ld"}, {"l", "d"},
			{"Ġ", "Ġ"}, {"1", "2"}, {"12", "3"}, {"4", "5"},
		},
		added: []map[string]any{special(256, "<|endoftext|>")},
		pre:   map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
		post:  map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
		decoder: map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
			"use_regex": true},
	}
}

// special returns a special added token as tokenizer.json lists it.
func special(id int, content string) map[string]any {
	return map[string]any{"id": id, "content": content, "single_word": false, "lstrip": false,
		"rstrip": false, "normalized": false, "special": true}
}

// Ids of sentencePieceSpec's tokens.
const (
	spUnk  = 0
	spBOS  = 1
	spEOS  = 2
	spByte = 3 // id of <0x00>; byte b is spByte+b
	spMeta = 259
	spH    = 260
	spI    = 261
	spHI   = 262 // "hi"
	spMHI  = 263 // "▁hi"
)

// sentencePieceSpec is a Llama-2 style tokenizer: <unk> <s> </s>, the 256
// byte tokens, "▁", "h", "i" and two merges, byte fallback, BOS template.
func sentencePieceSpec() spec {
	vocab := []string{"<unk>", "<s>", "</s>"}
	for b := 0; b < 256; b++ {
		vocab = append(vocab, fmt.Sprintf("<0x%02X>", b))
	}
	vocab = append(vocab, "▁", "h", "i")
	return spec{
		vocab:  vocab,
		merges: [][2]string{{"h", "i"}, {"▁", "hi"}},
		model:  map[string]any{"unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true},
		added:  []map[string]any{special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")},
		normalizer: map[string]any{"type": "Sequence", "normalizers": []any{
			map[string]any{"type": "Prepend", "prepend": "▁"},
			map[string]any{"type": "Replace", "pattern": map[string]any{"String": " "}, "content": "▁"},
		}},
		post: map[string]any{
			"type": "TemplateProcessing",
			"single": []any{
				map[string]any{"SpecialToken": map[string]any{"id": "<s>", "type_id": 0}},
				map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}},
			},
			"special_tokens": map[string]any{"<s>": map[string]any{"id": "<s>", "ids": []int{1}, "tokens": []string{"<s>"}}},
		},
		decoder: map[string]any{"type": "Sequence", "decoders": []any{
			map[string]any{"type": "Replace", "pattern": map[string]any{"String": "▁"}, "content": " "},
			map[string]any{"type": "ByteFallback"},
			map[string]any{"type": "Fuse"},
			map[string]any{"type": "Strip", "content": " ", "start": 1, "stop": 0},
		}},
	}
}

// byteIDs returns the byte-fallback ids of s in sentencePieceSpec.
func byteIDs(s string) []int {
	var ids []int
	for i := 0; i < len(s); i++ {
		ids = append(ids, spByte+int(s[i]))
	}
	return ids
}
