package tokenizer

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// A decoder turns token strings back into text. Like HF's decode_chain it
// maps a list of strings to a list of strings, so decoders can be chained;
// the final text is the concatenation of the last list.
type decoder interface {
	decodeChain(tokens []string) []string
}

func parseDecoder(raw json.RawMessage) (decoder, error) {
	typ, err := componentType(raw)
	if err != nil {
		return nil, err
	}
	switch typ {
	case "ByteLevel":
		return byteLevelDecoder{}, nil
	case "ByteFallback":
		return byteFallbackDecoder{}, nil
	case "Fuse":
		return fuseDecoder{}, nil
	case "Replace":
		r, err := parseReplace(raw)
		if err != nil {
			return nil, fmt.Errorf("Replace: %w", err)
		}
		return r, nil
	case "Strip":
		var c struct {
			Content string `json:"content"`
			Start   int    `json:"start"`
			Stop    int    `json:"stop"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("Strip: %w", err)
		}
		r, n := utf8.DecodeRuneInString(c.Content)
		if n == 0 || n != len(c.Content) || c.Start < 0 || c.Stop < 0 {
			return nil, fmt.Errorf("Strip: want one content character and non-negative start and stop, have %q, %d, %d", c.Content, c.Start, c.Stop)
		}
		return stripDecoder{content: r, start: c.Start, stop: c.Stop}, nil
	case "Metaspace":
		m, err := parseMetaspace(raw)
		if err != nil {
			return nil, fmt.Errorf("Metaspace: %w", err)
		}
		return metaspaceDecoder{m}, nil
	case "Sequence":
		var c struct {
			Decoders []json.RawMessage `json:"decoders"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("Sequence: %w", err)
		}
		seq := make(sequenceDecoder, len(c.Decoders))
		for i, r := range c.Decoders {
			if seq[i], err = parseDecoder(r); err != nil {
				return nil, fmt.Errorf("Sequence[%d]: %w", i, err)
			}
		}
		return seq, nil
	}
	return nil, fmt.Errorf("unsupported decoder type %q (supported: ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, Sequence)", typ)
}

// sequenceDecoder chains decoders.
type sequenceDecoder []decoder

func (s sequenceDecoder) decodeChain(tokens []string) []string {
	for _, d := range s {
		tokens = d.decodeChain(tokens)
	}
	return tokens
}

// byteFallbackDecoder turns runs of byte tokens such as "<0xE2>" back into
// text. A run that is not valid UTF-8 becomes one U+FFFD per byte, as in HF.
type byteFallbackDecoder struct{}

func (byteFallbackDecoder) decodeChain(tokens []string) []string {
	out := make([]string, 0, len(tokens))
	var run []byte
	flush := func() {
		if len(run) == 0 {
			return
		}
		if utf8.Valid(run) {
			out = append(out, string(run))
		} else {
			for range run {
				out = append(out, string(utf8.RuneError))
			}
		}
		run = run[:0]
	}
	for _, t := range tokens {
		if b, ok := byteToken(t); ok {
			run = append(run, b)
			continue
		}
		flush()
		out = append(out, t)
	}
	flush()
	return out
}

// byteToken parses a byte-fallback token "<0xNN>".
func byteToken(t string) (byte, bool) {
	if len(t) != 6 || !strings.HasPrefix(t, "<0x") || t[5] != '>' {
		return 0, false
	}
	b, err := strconv.ParseUint(t[3:5], 16, 8)
	return byte(b), err == nil
}

// fuseDecoder joins all tokens into one.
type fuseDecoder struct{}

func (fuseDecoder) decodeChain(tokens []string) []string {
	return []string{strings.Join(tokens, "")}
}

// stripDecoder removes up to start leading and stop trailing copies of
// content from each token.
type stripDecoder struct {
	content     rune
	start, stop int
}

func (d stripDecoder) decodeChain(tokens []string) []string {
	for i, t := range tokens {
		for n := 0; n < d.start; n++ {
			r, w := utf8.DecodeRuneInString(t)
			if w == 0 || r != d.content {
				break
			}
			t = t[w:]
		}
		for n := 0; n < d.stop; n++ {
			r, w := utf8.DecodeLastRuneInString(t)
			if w == 0 || r != d.content {
				break
			}
			t = t[:len(t)-w]
		}
		tokens[i] = t
	}
	return tokens
}

// metaspaceDecoder turns replacement characters back into spaces. In the
// first token HF drops them instead (they are the prepended prefix) unless
// nothing was prepended.
type metaspaceDecoder struct{ metaspace }

func (d metaspaceDecoder) decodeChain(tokens []string) []string {
	for i, t := range tokens {
		with := " "
		if i == 0 && d.scheme != prependNever {
			with = ""
		}
		tokens[i] = strings.ReplaceAll(t, d.replacement, with)
	}
	return tokens
}
