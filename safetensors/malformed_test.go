package safetensors

import (
	"encoding/binary"
	"strings"
	"testing"
)

// malformedCases are invalid files with the phrases their error must
// contain besides the file name.
var malformedCases = []struct {
	name string
	file []byte
	want []string
}{
	{"shorter than 8 bytes", []byte{1, 2, 3, 4, 5}, []string{"5 bytes", "shorter than"}},
	{"empty file", nil, []string{"0 bytes", "shorter than"}},
	{"header length past end", binary.LittleEndian.AppendUint64(nil, 64), []string{"header length 64", "past the end"}},
	{"header length past end with data", append(binary.LittleEndian.AppendUint64(nil, 1000), "{}"...), []string{"header length 1000", "past the end"}},
	{"oversized header", binary.LittleEndian.AppendUint64(nil, 100_000_001), []string{"100000001", "exceeds"}},
	{"huge header length", binary.LittleEndian.AppendUint64(nil, 1<<63), []string{"exceeds"}},
	{"not JSON", rawFile(`{"w": {"dtype": "F32", `, nil), []string{"not a JSON object", "unexpected end"}},
	{"trailing garbage", rawFile(`{} x`, nil), []string{"not a JSON object", "invalid character"}},
	{"array header", rawFile(`[1, 2]`, nil), []string{"not a JSON object", "array"}},
	{"null header", rawFile(`null    `, nil), []string{"not a JSON object", "null"}},
	{"empty header", rawFile(``, nil), []string{"not a JSON object"}},
	{"invalid UTF-8", rawFile("{\"w\xff\": {}}", nil), []string{"UTF-8"}},
	{"entry not an object", rawFile(`{"w": [1, 2]}`, nil), []string{`tensor "w"`, "not a JSON object"}},
	{"unknown dtype", rawFile(`{"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}`, make([]byte, 2)),
		[]string{`tensor "w"`, "F8_E4M3"}},
	{"dtype not a string", rawFile(`{"w": {"dtype": 5, "shape": [2], "data_offsets": [0, 8]}}`, make([]byte, 8)),
		[]string{`tensor "w"`, "dtype"}},
	{"negative shape", rawFile(`{"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}`, make([]byte, 8)),
		[]string{`tensor "w"`, "shape", "-1"}},
	{"non-integer shape", rawFile(`{"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}`, make([]byte, 4)),
		[]string{`tensor "w"`, "shape", "1.5"}},
	{"shape not an array", rawFile(`{"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}`, make([]byte, 8)),
		[]string{`tensor "w"`, "shape"}},
	{"missing data_offsets", rawFile(`{"w": {"dtype": "F32", "shape": [2]}}`, nil), []string{`tensor "w"`, "keys"}},
	{"extra key", rawFile(`{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}`, make([]byte, 8)),
		[]string{`tensor "w"`, "keys"}},
	{"one data offset", rawFile(`{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}`, make([]byte, 8)),
		[]string{`tensor "w"`, "data_offsets"}},
	{"negative data offset", rawFile(`{"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}`, make([]byte, 8)),
		[]string{`tensor "w"`, "data_offsets"}},
	{"offsets out of range", rawFile(`{"w": {"dtype": "F32", "shape": [25], "data_offsets": [0, 100]}}`, make([]byte, 8)),
		[]string{`tensor "w"`, "data_offsets [0 100]", "out of range", "8-byte data area"}},
	{"offsets past int64", rawFile(`{"w": {"dtype": "U8", "shape": [1], "data_offsets": [18446744073709551614, 18446744073709551615]}}`, nil),
		[]string{`tensor "w"`, "out of range"}},
	{"begin after end", rawFile(`{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}`, make([]byte, 8)),
		[]string{`tensor "w"`, "data_offsets [8 0]", "begin is after end"}},
	{"size mismatch", rawFile(`{"model.layers.0.mlp.up_proj.weight": {"dtype": "BF16", "shape": [896, 768], "data_offsets": [0, 1376254]}}`, make([]byte, 1376254)),
		[]string{`tensor "model.layers.0.mlp.up_proj.weight": shape [896 768] of BF16 needs 1376256 bytes, data_offsets give 1376254`}},
	{"shape overflow", rawFile(`{"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}}`, nil),
		[]string{`tensor "w"`, "overflows"}},
	{"shape overflow with zero", rawFile(`{"w": {"dtype": "F32", "shape": [0, 9223372036854775807], "data_offsets": [0, 0]}}`, nil),
		[]string{`tensor "w"`, "overflows"}},
	{"overlap", rawFile(`{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}`, make([]byte, 12)),
		[]string{`"a" [0 8]`, `"b" [4 12]`, "overlap"}},
	{"same offsets", rawFile(`{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}`, make([]byte, 8)),
		[]string{`"a"`, `"b"`, "overlap"}},
	{"empty tensor inside another", rawFile(`{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}`, make([]byte, 8)),
		[]string{`"a"`, `"e"`, "overlap"}},
	{"hole at start", rawFile(`{"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}`, make([]byte, 12)),
		[]string{`tensor "w"`, "4-byte hole at the start"}},
	{"hole between", rawFile(`{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}`, make([]byte, 20)),
		[]string{`"a" (ends at 8)`, `"b" (begins at 12)`, "4-byte hole"}},
	{"trailing bytes", rawFile(`{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}`, make([]byte, 12)),
		[]string{`tensor "w"`, "4 unused bytes"}},
	{"data without tensors", rawFile(`{"__metadata__": {"format": "pt"}}`, make([]byte, 3)),
		[]string{"3 bytes", "no tensors"}},
	{"metadata number", rawFile(`{"__metadata__": {"format": "pt", "step": 100}}`, nil),
		[]string{"__metadata__", `"step"`, "non-string value 100"}},
	{"metadata object value", rawFile(`{"__metadata__": {"cfg": {"a": "b"}}}`, nil),
		[]string{"__metadata__", `"cfg"`, "non-string"}},
	{"metadata not an object", rawFile(`{"__metadata__": ["pt"]}`, nil), []string{"__metadata__", "not a JSON object"}},
	{"first bad tensor in name order", rawFile(`{"b": {"dtype": "X", "shape": [], "data_offsets": [0, 0]}, "a": {"dtype": "Y", "shape": [], "data_offsets": [0, 0]}}`, nil),
		[]string{`tensor "a"`, `"Y"`}},
}

func TestMalformed(t *testing.T) {
	for _, tc := range malformedCases {
		t.Run(tc.name, func(t *testing.T) {
			bothPaths(t, func(t *testing.T, open func(string) (*Checkpoint, error)) {
				path := writeTestFile(t, t.TempDir(), "model.safetensors", tc.file)
				c, err := open(path)
				msg := checkMalformed(t, c, err, tc.want...)
				if !strings.HasPrefix(msg, "open checkpoint "+path+": ") {
					t.Errorf("error %q does not start with the file name", msg)
				}
			})
		})
	}
}

// TestValidEdgeCases checks files the format allows that a careless
// validator might reject.
func TestValidEdgeCases(t *testing.T) {
	for _, tc := range []struct {
		name  string
		file  []byte
		names []string
	}{
		{"no tensors", rawFile(`{}`, nil), nil},
		{"null metadata", rawFile(`{"__metadata__": null}`, nil), nil},
		{"padded header", rawFile(`{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}   `, []byte{1}), []string{"w"}},
		{"scalar and empty tensors at one offset",
			rawFile(`{"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "e1": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}, "e0": {"dtype": "BF16", "shape": [3, 0], "data_offsets": [0, 0]}}`, make([]byte, 4)),
			[]string{"e0", "e1", "s"}},
		{"unsorted offsets", rawFile(`{"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}, "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}`, []byte{1, 2}),
			[]string{"a", "b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := openBytes("model.safetensors", tc.file)
			if err != nil {
				t.Fatal(err)
			}
			if got := c.Names(); len(got) != len(tc.names) || (len(got) > 0 && strings.Join(got, ",") != strings.Join(tc.names, ",")) {
				t.Errorf("Names() = %v, want %v", got, tc.names)
			}
		})
	}
}
