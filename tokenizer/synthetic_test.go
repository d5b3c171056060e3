package tokenizer

import "testing"

// The synthetic checkpoints' tokenizer maps every byte to its own id and
// back, and keeps its special token whole.
func TestByteLevelJSON(t *testing.T) {
	data, err := ByteLevelJSON("<|endoftext|>")
	if err != nil {
		t.Fatal(err)
	}
	tok, err := Parse("synthetic tokenizer.json", data)
	if err != nil {
		t.Fatal(err)
	}
	text := "Byte-level: é, \x00\t\n and <|endoftext|>."
	ids := tok.Encode(text, true)
	for i, id := range ids[:len("Byte-level")] {
		if id != int(text[i]) {
			t.Fatalf("id %d = %d, want the byte %d", i, id, text[i])
		}
	}
	if got := tok.Decode(ids, false); got != text {
		t.Errorf("round trip %q, want %q", got, text)
	}
	if id, ok := tok.TokenID("<|endoftext|>"); !ok || id != 256 || tok.VocabSize() != 257 {
		t.Errorf("special id %d (%v), vocab %d; want 256, 257", id, ok, tok.VocabSize())
	}
	if _, err := ByteLevelJSON("a"); err == nil {
		t.Error("a special token equal to a byte token must be refused")
	}
}
