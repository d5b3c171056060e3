package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// The split patterns of GPT-2, Llama-3 and Qwen2, spelled exactly as in
// tokenizer.json. HF runs them with Oniguruma; Go's regexp has no lookahead
// (and its \s is ASCII-only), so each has a hand-written scanner below that
// finds the same matches as the backtracking engine.
const (
	gpt2Pattern   = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
	llama3Pattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	qwen2Pattern  = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
)

// A matcher returns the non-overlapping, non-empty matches of a pattern in
// s, in order, as byte ranges.
type matcher func(s string) [][2]int

// regexMatcher returns the scanner for one of the supported regex patterns.
func regexMatcher(pattern string) (matcher, bool) {
	switch pattern {
	case gpt2Pattern:
		return gpt2Matches, true
	case llama3Pattern:
		return func(s string) [][2]int { return scanMatches(s, 3) }, true
	case qwen2Pattern:
		return func(s string) [][2]int { return scanMatches(s, 1) }, true
	}
	return nil, false
}

// charClass partitions characters the way the patterns do.
type charClass uint8

const (
	classOther  charClass = iota // [^\s\p{L}\p{N}]; also each byte of invalid UTF-8
	classSpace                   // \s: Unicode White_Space, as in Oniguruma
	classLetter                  // \p{L}
	classNumber                  // \p{N}
)

// runeAt decodes the character at s[i:]; an invalid byte reads as a
// one-byte character of class other.
func runeAt(s string, i int) (rune, int, charClass) {
	r, w := utf8.DecodeRuneInString(s[i:])
	switch {
	case unicode.IsSpace(r):
		return r, w, classSpace
	case unicode.IsLetter(r):
		return r, w, classLetter
	case unicode.IsNumber(r):
		return r, w, classNumber
	}
	return r, w, classOther
}

// runEnd returns the end of the run of class c characters starting at i.
func runEnd(s string, i int, c charClass) int {
	for i < len(s) {
		_, w, ci := runeAt(s, i)
		if ci != c {
			break
		}
		i += w
	}
	return i
}

// spaceRunEnd matches `\s+(?!\S)|\s+` at i, which holds whitespace: the
// whole run when it ends the text or is a single character, otherwise the
// run less its last character, which is left to prefix the next word.
func spaceRunEnd(s string, i int) int {
	end, last := i, i
	for end < len(s) {
		_, w, c := runeAt(s, end)
		if c != classSpace {
			break
		}
		last = end
		end += w
	}
	if end < len(s) && last > i {
		return last
	}
	return end
}

// contraction returns the byte length of the contraction suffix
// (s|t|re|ve|m|ll|d) at the start of s, 0 if there is none. With fold the
// letters match case-insensitively under Unicode simple case folding.
func contraction(s string, fold bool) int {
	eq := func(r, want rune) bool {
		if r == want {
			return true
		}
		if !fold {
			return false
		}
		for f := unicode.SimpleFold(want); f != want; f = unicode.SimpleFold(f) {
			if f == r {
				return true
			}
		}
		return false
	}
	r1, w1 := utf8.DecodeRuneInString(s)
	if w1 == 0 {
		return 0
	}
	if eq(r1, 's') || eq(r1, 't') || eq(r1, 'm') || eq(r1, 'd') {
		return w1
	}
	r2, w2 := utf8.DecodeRuneInString(s[w1:])
	if w2 == 0 {
		return 0
	}
	if ((eq(r1, 'r') || eq(r1, 'v')) && eq(r2, 'e')) || (eq(r1, 'l') && eq(r2, 'l')) {
		return w1 + w2
	}
	return 0
}

// gpt2Matches scans s with the GPT-2 pattern. Every character starts a
// match, so the matches tile s.
func gpt2Matches(s string) [][2]int {
	m := make([][2]int, 0, len(s)/4+1) // English averages over 4 bytes a match
	for i := 0; i < len(s); {
		j := gpt2Next(s, i)
		m = append(m, [2]int{i, j})
		i = j
	}
	return m
}

// gpt2Next returns the end of the GPT-2 pattern's match at i.
func gpt2Next(s string, i int) int {
	r, w, c := runeAt(s, i)
	if r == '\'' {
		if n := contraction(s[i+w:], false); n > 0 {
			return i + w + n
		}
	}
	// ` ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+`: one optional space, then a
	// run of a single non-space class.
	j := i
	if r == ' ' && i+w < len(s) {
		if _, _, next := runeAt(s, i+w); next != classSpace {
			j, c = i+w, next
		}
	}
	if c != classSpace {
		return runEnd(s, j, c)
	}
	return spaceRunEnd(s, i)
}

// scanMatches scans s with the Llama-3 pattern (maxDigits 3) or the Qwen2
// pattern (maxDigits 1), which differ only in `\p{N}{1,3}` against `\p{N}`.
// Every character starts a match, so the matches tile s.
func scanMatches(s string, maxDigits int) [][2]int {
	m := make([][2]int, 0, len(s)/4+1)
	for i := 0; i < len(s); {
		j := llama3Next(s, i, maxDigits)
		m = append(m, [2]int{i, j})
		i = j
	}
	return m
}

// llama3Next returns the end of the Llama-3/Qwen2 pattern's match at i,
// trying the alternatives in the pattern's order.
func llama3Next(s string, i, maxDigits int) int {
	r, w, c := runeAt(s, i)
	// (?i:'s|'t|'re|'ve|'m|'ll|'d)
	if r == '\'' {
		if n := contraction(s[i+w:], true); n > 0 {
			return i + w + n
		}
	}
	// [^\r\n\p{L}\p{N}]?\p{L}+
	if c == classLetter {
		return runEnd(s, i, classLetter)
	}
	if r != '\r' && r != '\n' && c != classNumber && i+w < len(s) {
		if _, _, next := runeAt(s, i+w); next == classLetter {
			return runEnd(s, i+w, classLetter)
		}
	}
	// \p{N}{1,3} or \p{N}
	if c == classNumber {
		j := i
		for n := 0; n < maxDigits && j < len(s); n++ {
			_, wj, cj := runeAt(s, j)
			if cj != classNumber {
				break
			}
			j += wj
		}
		return j
	}
	// ` ?[^\s\p{L}\p{N}]+[\r\n]*`
	j := i
	if r == ' ' && i+w < len(s) {
		if _, _, next := runeAt(s, i+w); next == classOther {
			j, c = i+w, classOther
		}
	}
	if c == classOther {
		j = runEnd(s, j, classOther)
		for j < len(s) && (s[j] == '\r' || s[j] == '\n') {
			j++
		}
		return j
	}
	// Only whitespace is left. `\s*[\r\n]+` backtracks to the run's last
	// line break, if it has one.
	end, last, lastBreak := i, i, -1
	for end < len(s) {
		rj, wj, cj := runeAt(s, end)
		if cj != classSpace {
			break
		}
		if rj == '\r' || rj == '\n' {
			lastBreak = end
		}
		last = end
		end += wj
	}
	if lastBreak >= 0 {
		return lastBreak + 1
	}
	// `\s+(?!\S)|\s+`
	if end < len(s) && last > i {
		return last
	}
	return end
}
