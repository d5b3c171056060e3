package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/transmla/transmla/internal/sharedtest"
)

func loadShared(tb testing.TB, rel string) *Tokenizer {
	tb.Helper()
	tok, err := Load(sharedtest.Path(tb, rel))
	if err != nil {
		tb.Fatal(err)
	}
	return tok
}

func readShared(tb testing.TB, rel string) string {
	tb.Helper()
	data, err := os.ReadFile(sharedtest.Path(tb, rel))
	if err != nil {
		tb.Fatal(err)
	}
	return string(data)
}

// The token counts are those of HF tokenizers, from ../shared/README.md;
// the ByteLevel post-processor adds nothing.
func TestByteLevelReferenceCounts(t *testing.T) {
	tests := []struct {
		model, data string
		tokens      int
	}{
		{"llama-gqa-25m", "wikitext-2-raw/wiki.test.raw", 427942},
		{"qwen2-gqa-16m", "wikitext-2-raw/wiki.test.raw", 427942},
		{"llama-gqa-25m", "calibration/heldout.txt", 1099206},
	}
	for _, tt := range tests {
		t.Run(tt.model+"/"+filepath.Base(tt.data), func(t *testing.T) {
			tok := loadShared(t, "models/"+tt.model+"/tokenizer.json")
			text := readShared(t, "data/"+tt.data)
			ids := tok.Encode(text, true)
			if len(ids) != tt.tokens {
				t.Errorf("Encode gave %d tokens, want %d", len(ids), tt.tokens)
			}
			if got := tok.Decode(ids, false); got != text {
				i := 0
				for i < len(got) && i < len(text) && got[i] == text[i] {
					i++
				}
				t.Errorf("Decode(Encode(text)) differs from the text at byte %d: %q vs %q",
					i, got[i:min(i+40, len(got))], text[i:min(i+40, len(text))])
			}
			if _, ok := tok.BOS(); ok {
				t.Error("BOS() reports a BOS for a ByteLevel post-processor")
			}
			if got := tok.VocabSize(); got != 4096 {
				t.Errorf("VocabSize() = %d, want 4096", got)
			}
		})
	}
}

func TestStories260K(t *testing.T) {
	tok := loadShared(t, "models/stories260K/tokenizer.json")
	got := tok.Encode("Once upon a time, there was a little girl named Lily.", true)
	want := []int{1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426}
	if !slices.Equal(got, want) {
		t.Errorf("Encode = %v, want %v", got, want)
	}
	if id, ok := tok.BOS(); !ok || id != 1 {
		t.Errorf("BOS() = %d, %v, want 1, true", id, ok)
	}
	if got := tok.Encode("Once upon a time, there was a little girl named Lily.", false); !slices.Equal(got, want[1:]) {
		t.Errorf("Encode without special tokens = %v, want %v", got, want[1:])
	}

	var ids []int
	if err := json.Unmarshal([]byte(readShared(t, "models/stories260K/expected_greedy_ids.json")), &ids); err != nil {
		t.Fatal(err)
	}
	// The ids end with "." and hold no final newline token, so HF decodes
	// them to the text without the newline that ends EXPECTED_GREEDY.txt.
	expected := readShared(t, "models/stories260K/EXPECTED_GREEDY.txt")
	if !strings.HasSuffix(expected, ".\n") || ids[len(ids)-1] != 426 {
		t.Fatalf("reference files changed: text ends %q, last id %d", expected[len(expected)-2:], ids[len(ids)-1])
	}
	if got, want := tok.Decode(ids, true), strings.TrimSuffix(expected, "\n"); got != want {
		t.Errorf("Decode(expected_greedy_ids) =\n%q\nwant\n%q", got, want)
	}
	if got := tok.Decode(ids, false); !strings.HasPrefix(got, "<s> Once upon") {
		t.Errorf("Decode keeping special tokens starts %q, want %q", got[:min(len(got), 20)], "<s> Once upon")
	}
}

// BenchmarkEncodeWikiText measures encoding with a warm word cache (a
// tokenizer reused across texts) and a cold one (a fresh tokenizer).
func BenchmarkEncodeWikiText(b *testing.B) {
	path := sharedtest.Path(b, "models/llama-gqa-25m/tokenizer.json")
	data, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	text := readShared(b, "data/wikitext-2-raw/wiki.test.raw")
	parse := func(b *testing.B) *Tokenizer {
		tok, err := Parse(path, data)
		if err != nil {
			b.Fatal(err)
		}
		return tok
	}
	b.Run("warm", func(b *testing.B) {
		tok := parse(b)
		tok.Encode(text, true)
		b.SetBytes(int64(len(text)))
		for b.Loop() {
			tok.Encode(text, true)
		}
	})
	b.Run("cold", func(b *testing.B) {
		b.SetBytes(int64(len(text)))
		for b.Loop() {
			b.StopTimer()
			tok := parse(b)
			b.StartTimer()
			tok.Encode(text, true)
		}
	})
}

// stories260K's SentencePiece-style tokenizer (byte fallback, "▁" for
// spaces) on whole files: the count is what Hugging Face's tokenizers.js
// (@huggingface/tokenizers 0.2.0, an independent implementation) gives
// for wiki.test.raw with the same tokenizer.json, BOS included, and
// decoding the ids gives the text back byte for byte.
func TestStories260KFiles(t *testing.T) {
	tok := loadShared(t, "models/stories260K/tokenizer.json")
	for _, tt := range []struct {
		data   string
		tokens int // 0: not measured independently
	}{
		{"wikitext-2-raw/wiki.test.raw", 809290},
		{"calibration/heldout.txt", 0},
	} {
		t.Run(filepath.Base(tt.data), func(t *testing.T) {
			text := readShared(t, "data/"+tt.data)
			ids := tok.Encode(text, true)
			if tt.tokens != 0 && len(ids) != tt.tokens {
				t.Errorf("Encode gave %d tokens, want %d", len(ids), tt.tokens)
			}
			if ids[0] != 1 {
				t.Errorf("first id %d, want BOS 1", ids[0])
			}
			if got := tok.Decode(ids, true); got != text {
				i := 0
				for i < len(got) && i < len(text) && got[i] == text[i] {
					i++
				}
				t.Errorf("Decode(Encode(text)) differs from the text at byte %d: %q vs %q",
					i, got[i:min(i+40, len(got))], text[i:min(i+40, len(text))])
			}
		})
	}
}
