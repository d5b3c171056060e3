package tokenizer

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// Ids of byteLevelSpec's merged tokens.
const (
	blEOT   = 256
	blHello = 260
	blOr    = 262
	blWorld = 264 // "Ġworld"
	blLd    = 265
	bl123   = 268
	bl45    = 269
)

func TestByteLevelEncode(t *testing.T) {
	tok := byteLevelSpec().build(t)
	tests := []struct {
		in   string
		want []int
	}{
		{"", nil},
		{"hello world", []int{blHello, blWorld}},
		{"hello  world", []int{blHello, ' ', blWorld}},
		{"hello\n\nworld", []int{blHello, '\n', '\n', 'w', blOr, blLd}},
		{"hello<|endoftext|> world", []int{blHello, blEOT, blWorld}},
		{"<|endoftext|><|endoftext|>", []int{blEOT, blEOT}},
		{"12345", []int{bl123, bl45}},
		{"é", []int{0xC3, 0xA9}},
		// Invalid UTF-8 is encoded byte for byte.
		{"\xff", []int{0xFF}},
	}
	for _, tt := range tests {
		if got := tok.Encode(tt.in, true); !slices.Equal(got, tt.want) {
			t.Errorf("Encode(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
	ids := tok.Encode("hello<|endoftext|> world", true)
	if got := tok.Decode(ids, true); got != "hello world" {
		t.Errorf("Decode skipping special tokens = %q, want %q", got, "hello world")
	}
	if got := tok.Decode([]int{blHello, -1, 1 << 40, blWorld}, false); got != "hello world" {
		t.Errorf("Decode with unknown ids = %q, want %q", got, "hello world")
	}
	// A lone byte of a multi-byte character decodes to U+FFFD.
	if got := tok.Decode([]int{'a', 0xC3}, false); got != "a\ufffd" {
		t.Errorf("Decode of a truncated character = %q, want %q", got, "a\ufffd")
	}
}

func TestByteLevelAddPrefixSpace(t *testing.T) {
	s := byteLevelSpec()
	s.pre = map[string]any{"type": "ByteLevel", "add_prefix_space": true, "use_regex": true}
	tok := s.build(t)
	tests := []struct {
		in   string
		want []int
	}{
		{"world", []int{blWorld}},
		{" world", []int{blWorld}},
		// Each stretch between added tokens gets its own prefix space.
		{"world<|endoftext|>world", []int{blWorld, blEOT, blWorld}},
		{"", nil},
	}
	for _, tt := range tests {
		if got := tok.Encode(tt.in, false); !slices.Equal(got, tt.want) {
			t.Errorf("Encode(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	texts := []string{
		"", "hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n",
		"don't WE'LL 12345 3.14", "héllo wörld 日本語 😀👍🏽", "<|endoftext|> between <|endoftext|>",
		"a\u00a0b\u3000c", "\x00\x01\x7f",
	}
	bl := byteLevelSpec().build(t)
	sp := sentencePieceSpec().build(t)
	for _, text := range texts {
		if got := bl.Decode(bl.Encode(text, true), false); got != text {
			t.Errorf("byte-level round trip of %q gave %q", text, got)
		}
		if strings.Contains(text, "<|") {
			continue // SentencePiece spells that token in bytes, but the text is not special there
		}
		if got := sp.Decode(sp.Encode(text, true), true); got != text {
			t.Errorf("SentencePiece round trip of %q gave %q", text, got)
		}
	}
}

func TestSentencePiece(t *testing.T) {
	tok := sentencePieceSpec().build(t)
	emoji := "😀"
	tests := []struct {
		in   string
		want []int
	}{
		{"", []int{spBOS}},
		{"hi", []int{spBOS, spMHI}},
		{"hi hi", []int{spBOS, spMHI, spMHI}},
		// The emoji is not in the vocab: its four UTF-8 bytes stand in.
		{"hi " + emoji, append([]int{spBOS, spMHI, spMeta}, byteIDs(emoji)...)},
		// The normalizer runs on each stretch between added tokens.
		{"hi<s>hi", []int{spBOS, spMHI, spBOS, spMHI}},
		{"\xff", []int{spBOS, spMeta, spByte + 0xFF}},
	}
	for _, tt := range tests {
		if got := tok.Encode(tt.in, true); !slices.Equal(got, tt.want) {
			t.Errorf("Encode(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}

	ids := tok.Encode("hi "+emoji, true)
	if got, want := tok.Decode(ids, true), "hi "+emoji; got != want {
		t.Errorf("Decode(skip special) = %q, want %q", got, want)
	}
	// HF keeps "<s>" and then strips nothing, since the text no longer
	// starts with the space.
	if got, want := tok.Decode(ids, false), "<s> hi "+emoji; got != want {
		t.Errorf("Decode = %q, want %q", got, want)
	}
	// A run of byte tokens that is not UTF-8 gives one U+FFFD per byte.
	if got, want := tok.Decode(byteIDs(emoji[:2]), false), "\ufffd\ufffd"; got != want {
		t.Errorf("Decode(truncated bytes) = %q, want %q", got, want)
	}
	if id, ok := tok.BOS(); !ok || id != spBOS {
		t.Errorf("BOS() = %d, %v, want %d, true", id, ok, spBOS)
	}
}

func TestUnknownCharacters(t *testing.T) {
	const text = "hi😀😀"
	tests := []struct {
		name  string
		model map[string]any
		want  []int
	}{
		{"fused", map[string]any{"unk_token": "<unk>", "fuse_unk": true}, []int{spMHI, spUnk}},
		{"not fused", map[string]any{"unk_token": "<unk>", "fuse_unk": false}, []int{spMHI, spUnk, spUnk}},
		{"no unk token", map[string]any{}, []int{spMHI}},
	}
	for _, tt := range tests {
		s := sentencePieceSpec()
		s.model = tt.model
		if got := s.build(t).Encode(text, false); !slices.Equal(got, tt.want) {
			t.Errorf("%s: Encode(%q) = %v, want %v", tt.name, text, got, tt.want)
		}
	}

	// With byte fallback but no <0xF0> token, the emoji becomes <unk>. HF
	// emits the byte tokens of a later character before that pending
	// <unk>; the order is kept.
	s := sentencePieceSpec()
	s.vocab = slices.Clone(s.vocab)
	s.vocab[spByte+0xF0] = "no-byte"
	got := s.build(t).Encode("😀é", false)
	want := append(append([]int{spMeta}, byteIDs("é")...), spUnk)
	if !slices.Equal(got, want) {
		t.Errorf("Encode with a missing byte token = %v, want %v", got, want)
	}
}

func TestAddedTokenOptions(t *testing.T) {
	tok := func(id int, content string, opts ...string) addedPattern {
		a := addedToken{ID: id, Content: content}
		for _, o := range opts {
			switch o {
			case "lstrip":
				a.LStrip = true
			case "rstrip":
				a.RStrip = true
			case "single_word":
				a.SingleWord = true
			}
		}
		return addedPattern{text: content, tok: a}
	}
	tests := []struct {
		name string
		toks []addedPattern
		in   string
		want []string // added tokens in brackets
	}{
		{"plain", []addedPattern{tok(5, "<m>")}, "a <m> b", []string{"a ", "[<m>]", " b"}},
		{"lstrip", []addedPattern{tok(5, "<m>", "lstrip")}, "a  <m> b", []string{"a", "[  <m>]", " b"}},
		{"rstrip", []addedPattern{tok(5, "<m>", "rstrip")}, "a <m>\t b", []string{"a ", "[<m>\t ]", "b"}},
		{"single word", []addedPattern{tok(5, "ab", "single_word")}, "ab xaby ab", []string{"[ab]", " xaby ", "[ab]"}},
		{"longest", []addedPattern{tok(5, "<a>"), tok(6, "<a><b>")}, "x<a><b><a>", []string{"x", "[<a><b>]", "[<a>]"}},
	}
	for _, tt := range tests {
		var got []string
		for _, seg := range newAddedMatcher(tt.toks).split(tt.in) {
			if seg.id >= 0 {
				got = append(got, "["+seg.text+"]")
			} else {
				got = append(got, seg.text)
			}
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s: split(%q) = %q, want %q", tt.name, tt.in, got, tt.want)
		}
	}
}

func TestMetaspace(t *testing.T) {
	tests := []struct {
		name      string
		metaspace map[string]any
		in        string
		want      []int
	}{
		{"legacy", map[string]any{"add_prefix_space": true}, "hi hi", []int{spMHI, spMHI}},
		{"legacy no prefix", map[string]any{"add_prefix_space": false}, "hi hi", []int{spHI, spMHI}},
		{"always", map[string]any{"prepend_scheme": "always", "split": false}, "<s>hi", []int{spBOS, spMHI}},
		{"first", map[string]any{"prepend_scheme": "first", "split": false}, "<s>hi", []int{spBOS, spHI}},
		{"first at start", map[string]any{"prepend_scheme": "first", "split": true}, "hi<s>hi", []int{spMHI, spBOS, spHI}},
	}
	for _, tt := range tests {
		s := sentencePieceSpec()
		s.normalizer = nil
		cfg := map[string]any{"type": "Metaspace", "replacement": "▁"}
		for k, v := range tt.metaspace {
			cfg[k] = v
		}
		s.pre, s.decoder = cfg, cfg
		tok := s.build(t)
		got := tok.Encode(tt.in, false)
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s: Encode(%q) = %v, want %v", tt.name, tt.in, got, tt.want)
		}
		if got := tok.Decode(got, true); got != strings.ReplaceAll(tt.in, "<s>", "") {
			t.Errorf("%s: Decode(Encode(%q)) = %q", tt.name, tt.in, got)
		}
	}
}

// llama3Spec is shaped like Llama-3's tokenizer.json: a Split with the
// Llama-3 pattern before a regex-less ByteLevel, ignore_merges, and a
// Sequence post-processor that adds <|begin_of_text|> (256).
func llama3Spec(pattern string, ignoreMerges bool) spec {
	return spec{
		vocab:  append(byteAlphabet(), "<|begin_of_text|>", "Ġworld"),
		merges: [][2]string{{"1", "2"}, {"12", "3"}, {"4", "5"}},
		model:  map[string]any{"ignore_merges": ignoreMerges},
		added:  []map[string]any{special(256, "<|begin_of_text|>")},
		pre: map[string]any{"type": "Sequence", "pretokenizers": []any{
			map[string]any{"type": "Split", "pattern": map[string]any{"Regex": pattern}, "behavior": "Isolated", "invert": false},
			map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
		}},
		post: map[string]any{"type": "Sequence", "processors": []any{
			map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
			map[string]any{
				"type":           "TemplateProcessing",
				"single":         []any{map[string]any{"SpecialToken": map[string]any{"id": "<|begin_of_text|>", "type_id": 0}}, map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}}},
				"special_tokens": map[string]any{"<|begin_of_text|>": map[string]any{"id": "<|begin_of_text|>", "ids": []int{256}, "tokens": []string{"<|begin_of_text|>"}}},
			},
		}},
		decoder: map[string]any{"type": "ByteLevel"},
	}
}

func TestLlama3Style(t *testing.T) {
	const (
		bot   = 256
		world = 257
		t123  = 259
		t45   = 260
	)
	tests := []struct {
		name         string
		pattern      string
		ignoreMerges bool
		want         []int
	}{
		{"llama3", llama3Pattern, true, []int{bot, t123, t45, world}},
		{"qwen2", qwen2Pattern, true, []int{bot, '1', '2', '3', '4', '5', world}},
		{"merges only", llama3Pattern, false, []int{bot, t123, t45, ' ', 'w', 'o', 'r', 'l', 'd'}},
	}
	for _, tt := range tests {
		tok := llama3Spec(tt.pattern, tt.ignoreMerges).build(t)
		ids := tok.Encode("12345 world", true)
		if !slices.Equal(ids, tt.want) {
			t.Errorf("%s: Encode = %v, want %v", tt.name, ids, tt.want)
		}
		if got := tok.Decode(ids, true); got != "12345 world" {
			t.Errorf("%s: Decode = %q", tt.name, got)
		}
		if id, ok := tok.BOS(); !ok || id != bot {
			t.Errorf("%s: BOS() = %d, %v, want %d, true", tt.name, id, ok, bot)
		}
	}
}

func TestAccessors(t *testing.T) {
	tok := sentencePieceSpec().build(t)
	if got := tok.VocabSize(); got != 264 {
		t.Errorf("VocabSize() = %d, want 264", got)
	}
	for _, tt := range []struct {
		tok     string
		id      int
		special bool
	}{{"<s>", spBOS, true}, {"<0x41>", spByte + 0x41, false}, {"▁hi", spMHI, false}} {
		if id, ok := tok.TokenID(tt.tok); !ok || id != tt.id {
			t.Errorf("TokenID(%q) = %d, %v, want %d, true", tt.tok, id, ok, tt.id)
		}
		if s, ok := tok.Token(tt.id); !ok || s != tt.tok {
			t.Errorf("Token(%d) = %q, %v, want %q, true", tt.id, s, ok, tt.tok)
		}
		if got := tok.IsSpecial(tt.id); got != tt.special {
			t.Errorf("IsSpecial(%d) = %v, want %v", tt.id, got, tt.special)
		}
	}
	if _, ok := tok.TokenID("absent"); ok {
		t.Error(`TokenID("absent") found a token`)
	}
	for _, id := range []int{-1, 264, 1 << 40} {
		if _, ok := tok.Token(id); ok {
			t.Errorf("Token(%d) found a token", id)
		}
	}
}

func TestNoDecoderJoinsWithSpaces(t *testing.T) {
	s := sentencePieceSpec()
	s.decoder = nil
	tok := s.build(t)
	if got, want := tok.Decode([]int{spBOS, spMHI, spMeta}, false), "<s> ▁hi ▁"; got != want {
		t.Errorf("Decode = %q, want %q", got, want)
	}
}

func TestConcurrentEncode(t *testing.T) {
	tok := byteLevelSpec().build(t)
	texts := make([]string, 64)
	for i := range texts {
		texts[i] = fmt.Sprintf("hello world %d hello%d\n", i, i*i)
	}
	want := make([][]int, len(texts))
	for i, text := range texts {
		want[i] = byteLevelSpec().build(t).Encode(text, true)
	}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Go(func() {
			for i, text := range texts {
				if got := tok.Encode(text, true); !slices.Equal(got, want[i]) {
					t.Errorf("concurrent Encode(%q) = %v, want %v", text, got, want[i])
				}
			}
		})
	}
	wg.Wait()
}

func TestParseErrors(t *testing.T) {
	const model = `"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}`
	withModel := func(rest string) string { return `{` + model + rest + `}` }
	tests := []struct {
		name string
		json string
		want string // the error message, or with a trailing "…" its start
	}{
		{"unknown model type", `{"model": {"type": "Unigram", "vocab": []}}`,
			`bad.json: unsupported model type "Unigram" (supported: BPE)`},
		{"malformed JSON", `{"model": `, `bad.json: decode JSON: unexpected end of JSON input`},
		{"not an object", `[1, 2]`, `bad.json: decode JSON: json: cannot unmarshal array…`},
		{"no model", `{"model": null}`, `bad.json: no model`},
		{"model without type", `{"model": {"vocab": {}}}`, `bad.json: model: model has no type`},
		{"merge of unknown token", `{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a z"]}}`,
			`bad.json: BPE model: merge 0 ("a" "z"): token "z" not in vocab`},
		{"merge pair of unknown token", `{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"], ["z", "a"]]}}`,
			`bad.json: BPE model: merge 1 ("z" "a"): token "z" not in vocab`},
		{"merge result unknown", `{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["b a"]}}`,
			`bad.json: BPE model: merge 0 ("b" "a"): token "ba" not in vocab`},
		{"merge without space", `{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["aa"]}}`,
			`bad.json: BPE model: merge 0: "aa" is not two tokens separated by one space`},
		{"merge of three", `{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a a a"]}}`,
			`bad.json: BPE model: merge 0: "a a a" is not two tokens separated by one space`},
		{"merge not a string", `{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [5]}}`,
			`bad.json: BPE model: merge 0: 5 is neither "left right" nor ["left", "right"]`},
		{"vocab id too large", `{"model": {"type": "BPE", "vocab": {"a": 0, "b": 7}, "merges": []}}`,
			`bad.json: vocab token "b": id 7 out of range [0, 2)`},
		{"vocab id negative", `{"model": {"type": "BPE", "vocab": {"a": -1}, "merges": []}}`,
			`bad.json: vocab token "a": id -1 out of range [0, 1)`},
		{"vocab id shared", `{"model": {"type": "BPE", "vocab": {"a": 0, "b": 0}, "merges": []}}`,
			`bad.json: vocab tokens "a" and "b" share id 0`},
		{"vocab id not a number", `{"model": {"type": "BPE", "vocab": {"a": "x"}, "merges": []}}`,
			`bad.json: BPE model: json: cannot unmarshal string…`},
		{"no vocab", `{"model": {"type": "BPE", "merges": []}}`, `bad.json: BPE model: no vocab`},
		{"added id out of range", withModel(`, "added_tokens": [{"id": 9, "content": "x", "special": true}]`),
			`bad.json: added token "x": id 9 out of range [0, 4)`},
		{"added token empty", withModel(`, "added_tokens": [{"id": 3, "content": ""}]`),
			`bad.json: added token 3: empty content`},
		{"unk not in vocab", `{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "unk_token": "<unk>"}}`,
			`bad.json: BPE model: unk_token "<unk>" not in vocab`},
		{"dropout", `{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "dropout": 0.1}}`,
			`bad.json: BPE model: dropout 0.1 is not supported`},
		{"unsupported normalizer", withModel(`, "normalizer": {"type": "BertNormalizer"}`),
			`bad.json: normalizer: unsupported normalizer type "BertNormalizer" (supported: Prepend, Replace, NFC, NFD, NFKC, NFKD, Sequence)`},
		{"nested unsupported normalizer", withModel(`, "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "x"}, {"type": "Lowercase"}]}`),
			`bad.json: normalizer: Sequence[1]: unsupported normalizer type "Lowercase" (supported: Prepend, Replace, NFC, NFD, NFKC, NFKD, Sequence)`},
		{"normalizer without type", withModel(`, "normalizer": {}`), `bad.json: normalizer: component has no type`},
		{"regex Replace", withModel(`, "normalizer": {"type": "Replace", "pattern": {"Regex": " +"}, "content": " "}`),
			`bad.json: normalizer: Replace: unsupported regex pattern " +" (only String patterns are supported)`},
		{"unsupported pre-tokenizer", withModel(`, "pre_tokenizer": {"type": "Whitespace"}`),
			`bad.json: pre_tokenizer: unsupported pre-tokenizer type "Whitespace" (supported: ByteLevel, Split, Metaspace, Sequence)`},
		{"unsupported Split regex", withModel(`, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": false}`),
			`bad.json: pre_tokenizer: Split: unsupported regex "\\s+" (supported: the GPT-2, Llama-3 and Qwen2 split patterns)`},
		{"unsupported Split behavior", withModel(`, "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "Sideways"}`),
			`bad.json: pre_tokenizer: Split: unsupported split behavior "Sideways"`},
		{"Metaspace replacement", withModel(`, "pre_tokenizer": {"type": "Metaspace", "replacement": "ab"}`),
			`bad.json: pre_tokenizer: Metaspace: replacement "ab" is not a single character`},
		{"unsupported decoder", withModel(`, "decoder": {"type": "WordPiece"}`),
			`bad.json: decoder: unsupported decoder type "WordPiece" (supported: ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, Sequence)`},
		{"Strip content", withModel(`, "decoder": {"type": "Strip", "content": "", "start": 1, "stop": 0}`),
			`bad.json: decoder: Strip: want one content character and non-negative start and stop, have "", 1, 0`},
		{"unsupported post-processor", withModel(`, "post_processor": {"type": "BertProcessing"}`),
			`bad.json: post_processor: unsupported post-processor type "BertProcessing" (supported: ByteLevel, TemplateProcessing, Sequence)`},
		{"template without special token", withModel(`, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}], "special_tokens": {}}`),
			`bad.json: post_processor: TemplateProcessing: single[0]: special token "<s>" not in special_tokens`},
		{"template id out of range", withModel(`, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [99], "tokens": ["<s>"]}}}`),
			`bad.json: post_processor: TemplateProcessing: special token "<s>": id 99 out of range [0, 3)`},
		{"template with B", withModel(`, "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "B", "type_id": 0}}], "special_tokens": {}}`),
			`bad.json: post_processor: TemplateProcessing: single[0]: sequence "B" in a single-sequence template`},
	}
	for _, tt := range tests {
		_, err := Parse("bad.json", []byte(tt.json))
		if err == nil {
			t.Errorf("%s: Parse succeeded, want error %q", tt.name, tt.want)
			continue
		}
		if prefix, ok := strings.CutSuffix(tt.want, "…"); ok {
			if !strings.HasPrefix(err.Error(), prefix) {
				t.Errorf("%s: error %q, want it to start with %q", tt.name, err, prefix)
			}
		} else if err.Error() != tt.want {
			t.Errorf("%s: error\n%q, want\n%q", tt.name, err, tt.want)
		}
	}
}

func TestLoadMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokenizer.json")
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("Load(missing) error = %v, want one naming %s", err, path)
	}
}

// Qwen2's tokenizers normalize to NFC first: a decomposed "é" (e + U+0301)
// must encode as the two UTF-8 bytes of the precomposed U+00E9.
func TestNFCNormalizer(t *testing.T) {
	s := byteLevelSpec()
	s.normalizer = map[string]any{"type": "NFC"}
	tok := s.build(t)
	if got := tok.Encode("e\u0301", true); !slices.Equal(got, []int{0xC3, 0xA9}) {
		t.Errorf("Encode(e + combining acute) = %v, want [195 169]", got)
	}
}
