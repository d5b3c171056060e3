package main

import "testing"

func TestParseRopeStride(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want float64
		ok   bool
	}{
		{"", 0, true}, {"1", 1, true}, {"2", 2, true}, {"0.5", 0.5, true}, {"1/2", 0.5, true}, {"1/4", 0.25, true}, {"3/2", 1.5, true},
		{"0", 0, false}, {"-1", 0, false}, {"1/0", 0, false}, {"0/0", 0, false}, {"half", 0, false}, {"1/", 0, false}, {"NaN", 0, false}, {"Inf", 0, false},
	} {
		got, err := parseRopeStride(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseRopeStride(%q) = %v, %v; want %v (ok %v)", tc.in, got, err, tc.want, tc.ok)
		}
	}
}
