package tokenizer

import (
	"encoding/json"
	"fmt"
	"strings"

	"golang.org/x/text/unicode/norm"
)

// A normalizer rewrites a stretch of input text before pre-tokenization.
// HF applies it to each stretch between added tokens separately.
type normalizer interface {
	normalize(s string) string
}

func parseNormalizer(raw json.RawMessage) (normalizer, error) {
	typ, err := componentType(raw)
	if err != nil {
		return nil, err
	}
	switch typ {
	case "Prepend":
		var c struct {
			Prepend string `json:"prepend"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("Prepend: %w", err)
		}
		return prependNorm(c.Prepend), nil
	case "Replace":
		r, err := parseReplace(raw)
		if err != nil {
			return nil, fmt.Errorf("Replace: %w", err)
		}
		return r, nil
	case "NFC":
		return unicodeNorm{norm.NFC}, nil
	case "NFD":
		return unicodeNorm{norm.NFD}, nil
	case "NFKC":
		return unicodeNorm{norm.NFKC}, nil
	case "NFKD":
		return unicodeNorm{norm.NFKD}, nil
	case "Sequence":
		var c struct {
			Normalizers []json.RawMessage `json:"normalizers"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("Sequence: %w", err)
		}
		seq := make(sequenceNorm, len(c.Normalizers))
		for i, r := range c.Normalizers {
			if seq[i], err = parseNormalizer(r); err != nil {
				return nil, fmt.Errorf("Sequence[%d]: %w", i, err)
			}
		}
		return seq, nil
	}
	return nil, fmt.Errorf("unsupported normalizer type %q (supported: Prepend, Replace, NFC, NFD, NFKC, NFKD, Sequence)", typ)
}

// unicodeNorm applies a Unicode normalization form (Qwen2's tokenizers use NFC).
type unicodeNorm struct{ form norm.Form }

func (u unicodeNorm) normalize(s string) string { return u.form.String(s) }

// prependNorm puts a prefix before non-empty text.
type prependNorm string

func (p prependNorm) normalize(s string) string {
	if s == "" {
		return s
	}
	return string(p) + s
}

// replace substitutes every occurrence of a literal pattern; it serves as
// both the Replace normalizer and the Replace decoder.
type replace struct {
	old, new string
}

func parseReplace(raw json.RawMessage) (replace, error) {
	var c struct {
		Pattern patternJSON `json:"pattern"`
		Content string      `json:"content"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return replace{}, err
	}
	if c.Pattern.String == nil {
		if c.Pattern.Regex != nil {
			return replace{}, fmt.Errorf("unsupported regex pattern %q (only String patterns are supported)", *c.Pattern.Regex)
		}
		return replace{}, fmt.Errorf("pattern has neither String nor Regex")
	}
	return replace{old: *c.Pattern.String, new: c.Content}, nil
}

func (r replace) normalize(s string) string {
	// An empty pattern matches nothing in HF; strings.ReplaceAll would
	// insert the content between every character.
	if r.old == "" {
		return s
	}
	return strings.ReplaceAll(s, r.old, r.new)
}

func (r replace) decodeChain(tokens []string) []string {
	for i, t := range tokens {
		tokens[i] = r.normalize(t)
	}
	return tokens
}

// sequenceNorm runs normalizers one after the other.
type sequenceNorm []normalizer

func (s sequenceNorm) normalize(text string) string {
	for _, n := range s {
		text = n.normalize(text)
	}
	return text
}
