package tokenizer

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// checkIDs fails unless every id is one Token knows.
func checkIDs(t *testing.T, tok *Tokenizer, ids []int) {
	t.Helper()
	for _, id := range ids {
		if _, ok := tok.Token(id); !ok {
			t.Fatalf("Encode produced id %d, which has no token", id)
		}
	}
}

func FuzzEncode(f *testing.F) {
	byteLevel := byteLevelSpec().build(f)
	llama3 := llama3Spec(llama3Pattern, true).build(f)
	qwen2 := llama3Spec(qwen2Pattern, false).build(f)
	sentencePiece := sentencePieceSpec().build(f)
	f.Fuzz(func(t *testing.T, s string) {
		for name, m := range map[string]matcher{"GPT-2": gpt2Matches, "Llama-3": splitMatcher(llama3), "Qwen2": splitMatcher(qwen2)} {
			if got := strings.Join(pieces(s, m), ""); got != s {
				t.Fatalf("%s split of %q does not tile it: %q", name, s, got)
			}
		}
		for _, tok := range []*Tokenizer{byteLevel, llama3, qwen2} {
			ids := tok.Encode(s, false)
			checkIDs(t, tok, ids)
			if got := tok.Decode(ids, false); utf8.ValidString(s) && got != s {
				t.Fatalf("byte-level Decode(Encode(%q)) = %q", s, got)
			}
		}
		ids := sentencePiece.Encode(s, true)
		checkIDs(t, sentencePiece, ids)
		got := sentencePiece.Decode(ids, true)
		// Spaces come back for "▁", and each stretch between added tokens
		// gets its own "▁" prefix, so only other texts round-trip.
		if utf8.ValidString(s) && !strings.Contains(s, "▁") && !strings.Contains(s, "<s>") &&
			!strings.Contains(s, "</s>") && !strings.Contains(s, "<unk>") && got != s {
			t.Fatalf("SentencePiece Decode(Encode(%q)) = %q", s, got)
		}
	})
}

// splitMatcher digs the Split scanner out of a llama3Spec tokenizer.
func splitMatcher(tok *Tokenizer) matcher {
	return tok.pre.(sequencePre)[0].(splitPre).match
}

// FuzzParse feeds arbitrary bytes to the tokenizer.json parser: it must
// return a tokenizer or a one-line error naming the file, never panic, and
// an accepted tokenizer must encode and decode any text.
func FuzzParse(f *testing.F) {
	f.Add(byteLevelSpec().json(f))
	f.Add(sentencePieceSpec().json(f))
	f.Add(llama3Spec(llama3Pattern, true).json(f))
	const sample = "Hello wörld  12345\n\n<s>don't 😀\xff<|endoftext|>"
	f.Fuzz(func(t *testing.T, data []byte) {
		tok, err := Parse("fuzz.json", data)
		if err != nil {
			// The CLI prints errors as one line naming the file.
			if msg := err.Error(); !strings.HasPrefix(msg, "fuzz.json: ") || strings.Contains(msg, "\n") {
				t.Fatalf("error %q is not one line naming the file", msg)
			}
			return
		}
		for _, text := range []string{sample, string(data)} {
			ids := tok.Encode(text, true)
			checkIDs(t, tok, ids)
			tok.Decode(ids, true)
			tok.Decode(ids, false)
		}
		tok.Decode([]int{-1, 0, 1, 2, 3, tok.VocabSize()}, false)
		tok.BOS()
	})
}
