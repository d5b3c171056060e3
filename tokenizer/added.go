package tokenizer

import (
	"cmp"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"
)

// addedToken is an entry of tokenizer.json's added_tokens.
type addedToken struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized *bool  `json:"normalized"` // defaults to !Special, as in HF
	Special    bool   `json:"special"`
}

func (a addedToken) normalized() bool {
	if a.Normalized == nil {
		return !a.Special
	}
	return *a.Normalized
}

// addedMatcher finds added tokens in text the way HF's AddedVocabulary
// does: leftmost-longest, honouring single_word, lstrip and rstrip.
type addedMatcher struct {
	patterns []addedPattern
	byFirst  [256][]int // indices into patterns by first byte, longest first
}

// addedPattern is the text an added token is matched as: its content, or
// for tokens marked normalized, its content after normalization.
type addedPattern struct {
	text string
	tok  addedToken
}

// newAddedMatcher returns nil when there is nothing to match.
func newAddedMatcher(patterns []addedPattern) *addedMatcher {
	m := &addedMatcher{}
	for _, p := range patterns {
		if p.text != "" {
			m.patterns = append(m.patterns, p)
		}
	}
	if len(m.patterns) == 0 {
		return nil
	}
	for i, p := range m.patterns {
		m.byFirst[p.text[0]] = append(m.byFirst[p.text[0]], i)
	}
	for _, idx := range m.byFirst {
		slices.SortStableFunc(idx, func(a, b int) int {
			return cmp.Compare(len(m.patterns[b].text), len(m.patterns[a].text))
		})
	}
	return m
}

// segment is a stretch of text: an added token (id >= 0) or plain text
// (id -1) starting at byte offset start.
type segment struct {
	text  string
	start int
	id    int
}

// split cuts s into added tokens and the non-empty plain text between
// them. A nil matcher leaves s whole.
func (m *addedMatcher) split(s string) []segment {
	if s == "" {
		return nil
	}
	if m == nil {
		return []segment{{s, 0, -1}}
	}
	var segs []segment
	done := 0 // end of the last segment emitted
	for i := 0; i < len(s); {
		p := m.longestAt(s, i)
		if p == nil {
			i++
			continue
		}
		start, stop := i, i+len(p.text)
		// HF's automaton resumes after the match, even one rejected below.
		i = stop
		tok := p.tok
		if tok.SingleWord && ((start > 0 && endsWithWordChar(s[:start])) || (stop < len(s) && startsWithWordChar(s[stop:]))) {
			continue
		}
		if tok.LStrip {
			start = max(start-trailingSpaceLen(s[:start]), done)
		}
		if tok.RStrip {
			stop += leadingSpaceLen(s[stop:])
		}
		if start < done {
			// Only possible inside whitespace an rstrip already took.
			continue
		}
		if done < start {
			segs = append(segs, segment{s[done:start], done, -1})
		}
		segs = append(segs, segment{s[start:stop], start, tok.ID})
		done = stop
	}
	if done < len(s) {
		segs = append(segs, segment{s[done:], done, -1})
	}
	return segs
}

// longestAt returns the longest pattern that starts at s[i:], or nil.
func (m *addedMatcher) longestAt(s string, i int) *addedPattern {
	for _, k := range m.byFirst[s[i]] {
		if strings.HasPrefix(s[i:], m.patterns[k].text) {
			return &m.patterns[k]
		}
	}
	return nil
}

// isWordChar is Rust regex's Unicode \w, which HF uses for single_word.
func isWordChar(r rune) bool {
	return unicode.IsLetter(r) || unicode.Is(unicode.Nl, r) || unicode.Is(unicode.Other_Alphabetic, r) ||
		unicode.IsMark(r) || unicode.Is(unicode.Nd, r) || unicode.Is(unicode.Pc, r) || unicode.Is(unicode.Join_Control, r)
}

func endsWithWordChar(s string) bool {
	r, _ := utf8.DecodeLastRuneInString(s)
	return isWordChar(r)
}

func startsWithWordChar(s string) bool {
	r, _ := utf8.DecodeRuneInString(s)
	return isWordChar(r)
}

// trailingSpaceLen is the byte length of the whitespace that ends s.
func trailingSpaceLen(s string) int {
	return len(s) - len(strings.TrimRightFunc(s, unicode.IsSpace))
}

// leadingSpaceLen is the byte length of the whitespace that starts s.
func leadingSpaceLen(s string) int {
	return len(s) - len(strings.TrimLeftFunc(s, unicode.IsSpace))
}
