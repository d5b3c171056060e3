package tokenizer

import (
	"slices"
	"testing"
)

// pieces applies a matcher and returns the matched texts.
func pieces(s string, m matcher) []string {
	var out []string
	for _, r := range m(s) {
		out = append(out, s[r[0]:r[1]])
	}
	return out
}

// The expected splits are worked out by hand from each regular
// expression's meaning (alternatives tried in order, greedy, backtracking).
func TestGPT2Split(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"Hello world", []string{"Hello", " world"}},
		// A space run before a word gives its last space to the word.
		{"Hello  world", []string{"Hello", " ", " world"}},
		{"  leading", []string{" ", " leading"}},
		{"a\n\nb", []string{"a", "\n", "\n", "b"}},
		{"a \tb", []string{"a", " ", "\t", "b"}},
		{"a\r\n b", []string{"a", "\r\n", " b"}},
		// Trailing whitespace stays together.
		{"x   ", []string{"x", "   "}},
		{"x\n", []string{"x", "\n"}},
		{"don't", []string{"don", "'t"}},
		{"I'm they're we've she'll he'd it's", []string{"I", "'m", " they", "'re", " we", "'ve", " she", "'ll", " he", "'d", " it", "'s"}},
		// Contractions are case-sensitive in GPT-2's pattern.
		{"WE'LL", []string{"WE", "'", "LL"}},
		{"'s'", []string{"'s", "'"}},
		{" 's", []string{" '", "s"}},
		{"abc123 456", []string{"abc", "123", " 456"}},
		{"3.14", []string{"3", ".", "14"}},
		{"Hello, world!!", []string{"Hello", ",", " world", "!!"}},
		{" ...x", []string{" ...", "x"}},
		{"héllo wörld", []string{"héllo", " wörld"}},
		{"日本語 テキスト", []string{"日本語", " テキスト"}},
		{"😀 hi", []string{"😀", " hi"}},
		{"Ⅻ½", []string{"Ⅻ½"}}, // \p{N} covers Nl and No
		{"a\u00a0b", []string{"a", "\u00a0", "b"}},
		{"a\u3000\u3000b", []string{"a", "\u3000", "\u3000", "b"}},
		{"\xffab\xfe", []string{"\xff", "ab", "\xfe"}},
	}
	for _, tt := range tests {
		if got := pieces(tt.in, gpt2Matches); !slices.Equal(got, tt.want) {
			t.Errorf("GPT-2 split of %q = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestLlama3AndQwen2Split(t *testing.T) {
	llama3, _ := regexMatcher(llama3Pattern)
	qwen2, _ := regexMatcher(qwen2Pattern)
	tests := []struct {
		in          string
		llama, qwen []string
	}{
		{"Hello  world", []string{"Hello", " ", " world"}, nil},
		// Contractions are case-insensitive here.
		{"I'M here", []string{"I", "'M", " here"}, nil},
		{"don't", []string{"don", "'t"}, nil},
		{"12345", []string{"123", "45"}, []string{"1", "2", "3", "4", "5"}},
		{"a 1", []string{"a", " ", "1"}, nil},
		// Any single non-letter, non-digit, non-newline may lead a word.
		{"(hello)", []string{"(hello", ")"}, nil},
		{"\tfoo", []string{"\tfoo"}, nil},
		{"'hello", []string{"'hello"}, nil},
		// Punctuation takes the line breaks that follow it.
		{"...\n\nnext", []string{"...\n\n", "next"}, nil},
		{" !?\r\nx", []string{" !?\r\n", "x"}, nil},
		// Whitespace up to the last line break is one piece.
		{"a\n\nb", []string{"a", "\n\n", "b"}, nil},
		{"x  \n  y", []string{"x", "  \n", " ", " y"}, nil},
		{"x\n \ny", []string{"x", "\n \n", "y"}, nil},
		{"x   ", []string{"x", "   "}, nil},
		{"x  ", []string{"x", "  "}, nil},
		{"日本語 テキスト", []string{"日本語", " テキスト"}, nil},
	}
	for _, tt := range tests {
		if tt.qwen == nil {
			tt.qwen = tt.llama
		}
		if got := pieces(tt.in, llama3); !slices.Equal(got, tt.llama) {
			t.Errorf("Llama-3 split of %q = %q, want %q", tt.in, got, tt.llama)
		}
		if got := pieces(tt.in, qwen2); !slices.Equal(got, tt.qwen) {
			t.Errorf("Qwen2 split of %q = %q, want %q", tt.in, got, tt.qwen)
		}
	}
}

// The examples of HF's SplitDelimiterBehavior documentation.
func TestSplitBehaviors(t *testing.T) {
	const in = "the-final--countdown"
	tests := []struct {
		behavior splitBehavior
		invert   bool
		want     []string
		fromZero bool
	}{
		{splitRemoved, false, []string{"the", "final", "countdown"}, true},
		{splitIsolated, false, []string{"the", "-", "final", "-", "-", "countdown"}, true},
		{splitMergedWithPrevious, false, []string{"the-", "final-", "-", "countdown"}, true},
		{splitMergedWithNext, false, []string{"the", "-final", "-", "-countdown"}, true},
		{splitContiguous, false, []string{"the", "-", "final", "--", "countdown"}, true},
		{splitRemoved, true, []string{"-", "-", "-"}, false},
	}
	for _, tt := range tests {
		got, fromZero := splitText(in, literalMatches("-")(in), tt.behavior, tt.invert)
		if !slices.Equal(got, tt.want) || fromZero != tt.fromZero {
			t.Errorf("split(%d, invert %v) = %q, %v, want %q, %v", tt.behavior, tt.invert, got, fromZero, tt.want, tt.fromZero)
		}
	}
}

func TestLossyUTF8(t *testing.T) {
	tests := []struct{ in, want string }{
		{"plain é", "plain é"},
		{"\xe2\x82a", "\ufffda"},               // truncated 3-byte sequence: one U+FFFD
		{"\xf0\x9f\x98", "\ufffd"},             // truncated 4-byte sequence
		{"\xff\xfe", "\ufffd\ufffd"},           // bytes that never start a sequence
		{"\xed\xa0\x80", "\ufffd\ufffd\ufffd"}, // a surrogate is no valid prefix
		{"\xc0\xaf", "\ufffd\ufffd"},           // overlong
		{"a\xf4\x90\x80\x80", "a\ufffd\ufffd\ufffd\ufffd"},
	}
	for _, tt := range tests {
		if got := lossyUTF8([]byte(tt.in)); got != tt.want {
			t.Errorf("lossyUTF8(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
