package tokenizer

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"
)

// A preTokenizer cuts normalized text into the words the model encodes
// one by one.
type preTokenizer interface {
	// preTokenize splits words further. atStart reports whether words[0]
	// begins at the start of the input text (Metaspace's "first" scheme
	// depends on it); the result reports the same for the returned words.
	preTokenize(words []string, atStart bool) ([]string, bool)
}

func parsePreTokenizer(raw json.RawMessage) (preTokenizer, error) {
	typ, err := componentType(raw)
	if err != nil {
		return nil, err
	}
	switch typ {
	case "ByteLevel":
		// Missing flags take the defaults of HF's ByteLevel::default().
		c := struct {
			AddPrefixSpace *bool `json:"add_prefix_space"`
			UseRegex       *bool `json:"use_regex"`
		}{}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("ByteLevel: %w", err)
		}
		return byteLevelPre{addPrefixSpace: orTrue(c.AddPrefixSpace), useRegex: orTrue(c.UseRegex)}, nil
	case "Split":
		return parseSplit(raw)
	case "Metaspace":
		m, err := parseMetaspace(raw)
		if err != nil {
			return nil, fmt.Errorf("Metaspace: %w", err)
		}
		return metaspacePre{m}, nil
	case "Sequence":
		var c struct {
			PreTokenizers []json.RawMessage `json:"pretokenizers"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("Sequence: %w", err)
		}
		seq := make(sequencePre, len(c.PreTokenizers))
		for i, r := range c.PreTokenizers {
			if seq[i], err = parsePreTokenizer(r); err != nil {
				return nil, fmt.Errorf("Sequence[%d]: %w", i, err)
			}
		}
		return seq, nil
	}
	return nil, fmt.Errorf("unsupported pre-tokenizer type %q (supported: ByteLevel, Split, Metaspace, Sequence)", typ)
}

// orTrue reads an optional flag that defaults to true.
func orTrue(b *bool) bool { return b == nil || *b }

// sequencePre runs pre-tokenizers one after the other.
type sequencePre []preTokenizer

func (s sequencePre) preTokenize(words []string, atStart bool) ([]string, bool) {
	for _, p := range s {
		words, atStart = p.preTokenize(words, atStart)
	}
	return words, atStart
}

// splitBehavior says what a Split does with the matched text.
type splitBehavior int

const (
	splitRemoved            splitBehavior = iota // dropped
	splitIsolated                                // a piece of its own
	splitMergedWithPrevious                      // appended to the piece before it
	splitMergedWithNext                          // prepended to the piece after it
	splitContiguous                              // consecutive matches form one piece
)

func parseSplitBehavior(s string) (splitBehavior, error) {
	switch s {
	case "Removed":
		return splitRemoved, nil
	case "Isolated":
		return splitIsolated, nil
	case "MergedWithPrevious":
		return splitMergedWithPrevious, nil
	case "MergedWithNext":
		return splitMergedWithNext, nil
	case "Contiguous":
		return splitContiguous, nil
	}
	return 0, fmt.Errorf("unsupported split behavior %q", s)
}

// splitPre is HF's Split pre-tokenizer.
type splitPre struct {
	match    matcher
	behavior splitBehavior
	invert   bool
}

func parseSplit(raw json.RawMessage) (preTokenizer, error) {
	var c struct {
		Pattern  patternJSON `json:"pattern"`
		Behavior string      `json:"behavior"`
		Invert   bool        `json:"invert"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, fmt.Errorf("Split: %w", err)
	}
	behavior, err := parseSplitBehavior(c.Behavior)
	if err != nil {
		return nil, fmt.Errorf("Split: %w", err)
	}
	p := splitPre{behavior: behavior, invert: c.Invert}
	switch {
	case c.Pattern.String != nil:
		p.match = literalMatches(*c.Pattern.String)
	case c.Pattern.Regex != nil:
		m, ok := regexMatcher(*c.Pattern.Regex)
		if !ok {
			return nil, fmt.Errorf("Split: unsupported regex %q (supported: the GPT-2, Llama-3 and Qwen2 split patterns)", *c.Pattern.Regex)
		}
		p.match = m
	default:
		return nil, fmt.Errorf("Split: pattern has neither String nor Regex")
	}
	return p, nil
}

func (p splitPre) preTokenize(words []string, atStart bool) ([]string, bool) {
	out := make([]string, 0, len(words))
	for i, w := range words {
		pieces, fromZero := splitText(w, p.match(w), p.behavior, p.invert)
		if i == 0 {
			atStart = atStart && fromZero
		}
		out = append(out, pieces...)
	}
	return out, atStart
}

// literalMatches matches occurrences of lit, leftmost first; an empty lit
// matches nothing, as in HF.
func literalMatches(lit string) matcher {
	return func(s string) [][2]int {
		if lit == "" {
			return nil
		}
		var m [][2]int
		for i := 0; ; {
			k := strings.Index(s[i:], lit)
			if k < 0 {
				return m
			}
			i += k
			m = append(m, [2]int{i, i + len(lit)})
			i += len(lit)
		}
	}
}

// span is a stretch of text being split, and whether a pattern matched it.
type span struct {
	start, end int
	match      bool
}

// splitText cuts s around matches (in order, not overlapping) the way HF's
// NormalizedString::split does for behavior; invert swaps which stretches
// count as matched. It returns the non-empty pieces and whether the first
// piece starts at offset 0 of s.
func splitText(s string, matches [][2]int, behavior splitBehavior, invert bool) ([]string, bool) {
	spans := make([]span, 0, 2*len(matches)+1)
	prev := 0
	for _, m := range matches {
		if m[0] > prev {
			spans = append(spans, span{prev, m[0], invert})
		}
		spans = append(spans, span{m[0], m[1], !invert})
		prev = m[1]
	}
	if prev < len(s) {
		spans = append(spans, span{prev, len(s), invert})
	}

	var kept []span
	switch behavior {
	case splitIsolated:
		kept = spans
	case splitRemoved:
		for _, sp := range spans {
			if !sp.match {
				kept = append(kept, sp)
			}
		}
	case splitContiguous:
		for i, sp := range spans {
			if i > 0 && sp.match == spans[i-1].match {
				kept[len(kept)-1].end = sp.end
			} else {
				kept = append(kept, sp)
			}
		}
	case splitMergedWithPrevious:
		for i, sp := range spans {
			if i > 0 && sp.match && !spans[i-1].match {
				kept[len(kept)-1].end = sp.end
			} else {
				kept = append(kept, sp)
			}
		}
	case splitMergedWithNext:
		// Walk backwards so that a match joins the piece after it.
		for i := len(spans) - 1; i >= 0; i-- {
			sp := spans[i]
			if i < len(spans)-1 && sp.match && !spans[i+1].match {
				kept[len(kept)-1].start = sp.start
			} else {
				kept = append(kept, sp)
			}
		}
		for i, j := 0, len(kept)-1; i < j; i, j = i+1, j-1 {
			kept[i], kept[j] = kept[j], kept[i]
		}
	}

	pieces := make([]string, 0, len(kept))
	fromZero := false
	for _, sp := range kept {
		if sp.end > sp.start {
			if len(pieces) == 0 {
				fromZero = sp.start == 0
			}
			pieces = append(pieces, s[sp.start:sp.end])
		}
	}
	return pieces, fromZero
}

// prependScheme says when Metaspace puts the replacement before a word.
type prependScheme int

const (
	prependAlways prependScheme = iota
	prependFirst                // only before the word at the start of the input
	prependNever
)

// metaspace holds the settings shared by the Metaspace pre-tokenizer and
// decoder.
type metaspace struct {
	replacement string // a single character
	scheme      prependScheme
	split       bool
}

func parseMetaspace(raw json.RawMessage) (metaspace, error) {
	var c struct {
		Replacement    string  `json:"replacement"`
		AddPrefixSpace *bool   `json:"add_prefix_space"`
		PrependScheme  *string `json:"prepend_scheme"`
		Split          *bool   `json:"split"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return metaspace{}, err
	}
	if utf8.RuneCountInString(c.Replacement) != 1 {
		return metaspace{}, fmt.Errorf("replacement %q is not a single character", c.Replacement)
	}
	m := metaspace{replacement: c.Replacement, split: orTrue(c.Split)}
	// Files older than prepend_scheme carry only add_prefix_space.
	switch {
	case c.PrependScheme != nil:
		switch *c.PrependScheme {
		case "always":
			m.scheme = prependAlways
		case "first":
			m.scheme = prependFirst
		case "never":
			m.scheme = prependNever
		default:
			return metaspace{}, fmt.Errorf("unsupported prepend_scheme %q", *c.PrependScheme)
		}
	case c.AddPrefixSpace != nil && !*c.AddPrefixSpace:
		m.scheme = prependNever
	}
	return m, nil
}

// metaspacePre is HF's Metaspace pre-tokenizer: spaces become the
// replacement character, which may also be prepended, and words are split
// before each replacement character.
type metaspacePre struct{ metaspace }

func (p metaspacePre) preTokenize(words []string, atStart bool) ([]string, bool) {
	out := make([]string, 0, len(words))
	for i, w := range words {
		w = strings.ReplaceAll(w, " ", p.replacement)
		if !strings.HasPrefix(w, p.replacement) &&
			(p.scheme == prependAlways || (p.scheme == prependFirst && i == 0 && atStart)) {
			w = p.replacement + w
		}
		if !p.split {
			out = append(out, w)
			continue
		}
		pieces, _ := splitText(w, literalMatches(p.replacement)(w), splitMergedWithNext, false)
		out = append(out, pieces...)
	}
	return out, atStart
}
