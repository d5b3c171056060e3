package tokenizer

import (
	"strings"
	"sync"
	"unicode/utf8"
)

// byteRuneLimit bounds the runes of GPT-2's byte alphabet: the 188 printable
// bytes map to themselves (all below 256) and the other 68 to 256..323.
const byteRuneLimit = 256 + 68

// byteTables is GPT-2's reversible map between bytes and printable runes,
// which lets byte-level BPE vocabularies be stored as readable strings.
type byteTables struct {
	toRune [256]rune
	toByte [byteRuneLimit]int16 // -1 where the rune is not in the alphabet
}

// byteLevelTables builds the tables once; they are never written afterwards.
var byteLevelTables = sync.OnceValue(func() *byteTables {
	t := new(byteTables)
	for i := range t.toByte {
		t.toByte[i] = -1
	}
	printable := func(b int) bool {
		return ('!' <= b && b <= '~') || (0xA1 <= b && b <= 0xAC) || (0xAE <= b && b <= 0xFF)
	}
	next := rune(256)
	for b := 0; b < 256; b++ {
		r := rune(b)
		if !printable(b) {
			r = next
			next++
		}
		t.toRune[b] = r
		t.toByte[r] = int16(b)
	}
	return t
})

// encode writes every byte of s as its alphabet rune.
func (t *byteTables) encode(s string) string {
	var b strings.Builder
	b.Grow(2 * len(s))
	for i := 0; i < len(s); i++ {
		b.WriteRune(t.toRune[s[i]])
	}
	return b.String()
}

// decode appends the bytes that token stands for. Like HF, a token holding
// any rune outside the alphabet (an added token such as "<|endoftext|>" is
// usually inside it, but need not be) contributes its raw UTF-8 bytes.
func (t *byteTables) decode(dst []byte, token string) []byte {
	start := len(dst)
	for _, r := range token {
		if r < 0 || r >= byteRuneLimit || t.toByte[r] < 0 {
			return append(dst[:start], token...)
		}
		dst = append(dst, byte(t.toByte[r]))
	}
	return dst
}

// byteLevelPre is HF's ByteLevel pre-tokenizer: optionally a leading space,
// optionally the GPT-2 split, then every byte rewritten into the alphabet.
type byteLevelPre struct {
	addPrefixSpace bool
	useRegex       bool
}

func (p byteLevelPre) preTokenize(words []string, atStart bool) ([]string, bool) {
	t := byteLevelTables()
	out := make([]string, 0, len(words))
	for _, w := range words {
		if p.addPrefixSpace && !strings.HasPrefix(w, " ") {
			w = " " + w
		}
		if !p.useRegex {
			out = append(out, t.encode(w))
			continue
		}
		pieces, _ := splitText(w, gpt2Matches(w), splitIsolated, false)
		for _, piece := range pieces {
			out = append(out, t.encode(piece))
		}
	}
	return out, atStart
}

// byteLevelDecoder is HF's ByteLevel decoder: all tokens are mapped back to
// bytes and joined, and the bytes are read as UTF-8 with invalid sequences
// replaced by U+FFFD.
type byteLevelDecoder struct{}

func (byteLevelDecoder) decodeChain(tokens []string) []string {
	t := byteLevelTables()
	var buf []byte
	for _, tok := range tokens {
		buf = t.decode(buf, tok)
	}
	return []string{lossyUTF8(buf)}
}

// lossyUTF8 converts b to a string the way Rust's String::from_utf8_lossy
// does: each maximal prefix of a valid sequence that is cut short, and each
// byte that cannot start one, becomes a single U+FFFD. (Go's own conversions
// replace byte by byte, which would disagree with HF on truncated sequences.)
func lossyUTF8(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	var s strings.Builder
	s.Grow(len(b) + 8)
	for len(b) > 0 {
		r, n := utf8.DecodeRune(b)
		if r != utf8.RuneError || n > 1 {
			s.Write(b[:n])
		} else {
			s.WriteRune(utf8.RuneError)
			n = invalidPrefixLen(b)
		}
		b = b[n:]
	}
	return s.String()
}

// invalidPrefixLen returns how many bytes of b, which does not start with a
// valid UTF-8 sequence, form the maximal prefix of one (at least 1).
func invalidPrefixLen(b []byte) int {
	lo, hi := byte(0x80), byte(0xBF) // allowed range of the second byte
	var need int
	switch c := b[0]; {
	case 0xC2 <= c && c <= 0xDF:
		need = 1
	case c == 0xE0:
		need, lo = 2, 0xA0
	case c == 0xED:
		need, hi = 2, 0x9F
	case 0xE1 <= c && c <= 0xEF:
		need = 2
	case c == 0xF0:
		need, lo = 3, 0x90
	case c == 0xF4:
		need, hi = 3, 0x8F
	case 0xF1 <= c && c <= 0xF3:
		need = 3
	default:
		return 1
	}
	n := 1
	for ; n <= need && n < len(b); n++ {
		if b[n] < lo || b[n] > hi {
			break
		}
		lo, hi = 0x80, 0xBF
	}
	return n
}
