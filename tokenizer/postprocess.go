package tokenizer

import (
	"encoding/json"
	"fmt"
)

// template is a post-processor reduced to its single-sequence template:
// fixed special-token ids around the encoded text. A nil template adds
// nothing.
type template []templatePiece

// templatePiece is either fixed ids or, when seq is set, the encoded text.
type templatePiece struct {
	ids []int
	seq bool
}

// apply wraps ids in the template.
func (t template) apply(ids []int) []int {
	if t == nil {
		return ids
	}
	var out []int
	for _, p := range t {
		if p.seq {
			out = append(out, ids...)
		} else {
			out = append(out, p.ids...)
		}
	}
	return out
}

// bos returns the id the template puts before the text when it is exactly
// one token.
func (t template) bos() (int, bool) {
	var before []int
	for _, p := range t {
		if p.seq {
			if len(before) == 1 {
				return before[0], true
			}
			return 0, false
		}
		before = append(before, p.ids...)
	}
	return 0, false
}

// then returns the template of applying t and then next.
func (t template) then(next template) template {
	if t == nil {
		return next
	}
	if next == nil {
		return t
	}
	var out template
	for _, p := range next {
		if p.seq {
			out = append(out, t...)
		} else {
			out = append(out, p)
		}
	}
	return out
}

// parsePostProcessor reads a post-processor; vocabSize bounds the ids a
// template may add.
func parsePostProcessor(raw json.RawMessage, vocabSize int) (template, error) {
	typ, err := componentType(raw)
	if err != nil {
		return nil, err
	}
	switch typ {
	case "ByteLevel":
		// It only adjusts offsets, which this package does not report.
		return nil, nil
	case "TemplateProcessing":
		t, err := parseTemplate(raw, vocabSize)
		if err != nil {
			return nil, fmt.Errorf("TemplateProcessing: %w", err)
		}
		return t, nil
	case "Sequence":
		var c struct {
			Processors []json.RawMessage `json:"processors"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("Sequence: %w", err)
		}
		var t template
		for i, r := range c.Processors {
			next, err := parsePostProcessor(r, vocabSize)
			if err != nil {
				return nil, fmt.Errorf("Sequence[%d]: %w", i, err)
			}
			t = t.then(next)
		}
		return t, nil
	}
	return nil, fmt.Errorf("unsupported post-processor type %q (supported: ByteLevel, TemplateProcessing, Sequence)", typ)
}

// parseTemplate reads the single template of a TemplateProcessing; the
// pair template is irrelevant to encoding one text.
func parseTemplate(raw json.RawMessage, vocabSize int) (template, error) {
	type ref struct {
		ID string `json:"id"`
	}
	var c struct {
		Single []struct {
			SpecialToken *ref `json:"SpecialToken"`
			Sequence     *ref `json:"Sequence"`
		} `json:"single"`
		SpecialTokens map[string]struct {
			IDs []int `json:"ids"`
		} `json:"special_tokens"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	t := template{}
	for i, p := range c.Single {
		switch {
		case p.Sequence != nil && p.SpecialToken == nil:
			if p.Sequence.ID != "A" {
				return nil, fmt.Errorf("single[%d]: sequence %q in a single-sequence template", i, p.Sequence.ID)
			}
			t = append(t, templatePiece{seq: true})
		case p.SpecialToken != nil && p.Sequence == nil:
			st, ok := c.SpecialTokens[p.SpecialToken.ID]
			if !ok {
				return nil, fmt.Errorf("single[%d]: special token %q not in special_tokens", i, p.SpecialToken.ID)
			}
			for _, id := range st.IDs {
				if id < 0 || id >= vocabSize {
					return nil, fmt.Errorf("special token %q: id %d out of range [0, %d)", p.SpecialToken.ID, id, vocabSize)
				}
			}
			t = append(t, templatePiece{ids: st.IDs})
		default:
			return nil, fmt.Errorf("single[%d]: want exactly one of SpecialToken and Sequence", i)
		}
	}
	return t, nil
}
