package rope

import (
	"math"
	"strings"
	"testing"
)

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-12*math.Max(math.Abs(a), math.Abs(b)) }

func TestDefaultAndLinear(t *testing.T) {
	inv, attn, err := Params{Dim: 8, Theta: 10000}.InvFreq()
	if err != nil {
		t.Fatal(err)
	}
	// θ^(-2j/d) for d = 8: 1, 10^-1, 10^-2, 10^-3.
	for j, want := range []float64{1, 0.1, 0.01, 0.001} {
		if !near(inv[j], want) {
			t.Errorf("default inv_freq[%d] = %v, want %v", j, inv[j], want)
		}
	}
	if attn != 1 {
		t.Errorf("default attention factor %v, want 1", attn)
	}
	lin, _, err := Params{Dim: 8, Theta: 10000, Scaling: Scaling{Type: "linear", Factor: 4}}.InvFreq()
	if err != nil {
		t.Fatal(err)
	}
	for j := range lin {
		if !near(lin[j], inv[j]/4) {
			t.Errorf("linear inv_freq[%d] = %v, want %v", j, lin[j], inv[j]/4)
		}
	}
}

// Llama 3.1's published scaling: factor 8, low 1, high 4, original context 8192.
func TestLlama3Bands(t *testing.T) {
	p := Params{Dim: 128, Theta: 500000, Scaling: Scaling{Type: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 8192}}
	base, _, _ := Params{Dim: 128, Theta: 500000}.InvFreq()
	got, _, err := p.InvFreq()
	if err != nil {
		t.Fatal(err)
	}
	for j := range got {
		wavelen := 2 * math.Pi / base[j]
		switch {
		case wavelen < 8192/4.0:
			if !near(got[j], base[j]) {
				t.Errorf("high frequency %d changed: %v → %v", j, base[j], got[j])
			}
		case wavelen > 8192:
			if !near(got[j], base[j]/8) {
				t.Errorf("low frequency %d = %v, want base/8 = %v", j, got[j], base[j]/8)
			}
		default:
			if got[j] > base[j] || got[j] < base[j]/8 {
				t.Errorf("band frequency %d = %v outside [base/8, base] = [%v, %v]", j, got[j], base[j]/8, base[j])
			}
		}
	}
}

func TestYarnAttentionFactor(t *testing.T) {
	p := Params{Dim: 64, Theta: 10000, Scaling: Scaling{Type: "yarn", Factor: 4, OriginalMaxPositionEmbeddings: 4096}}
	inv, attn, err := p.InvFreq()
	if err != nil {
		t.Fatal(err)
	}
	if want := 0.1*math.Log(4) + 1; !near(attn, want) {
		t.Errorf("yarn attention factor %v, want 0.1·ln 4 + 1 = %v", attn, want)
	}
	base, _, _ := Params{Dim: 64, Theta: 10000}.InvFreq()
	// The highest frequency is extrapolated (kept), the lowest interpolated (divided).
	if !near(inv[0], base[0]) || !near(inv[len(inv)-1], base[len(base)-1]/4) {
		t.Errorf("yarn ends: got %v, %v; want %v, %v", inv[0], inv[len(inv)-1], base[0], base[len(base)-1]/4)
	}
}

func TestErrors(t *testing.T) {
	for _, tc := range []struct {
		p    Params
		want string
	}{
		{Params{Dim: 7, Theta: 10000}, "even"},
		{Params{Dim: 8, Theta: 0}, "rope_theta"},
		{Params{Dim: 8, Theta: 10000, Scaling: Scaling{Type: "dynamic"}}, `unsupported rope_scaling type "dynamic"`},
		{Params{Dim: 8, Theta: 10000, Scaling: Scaling{Type: "llama3", Factor: 8}}, "llama3 scaling needs"},
	} {
		_, _, err := tc.p.InvFreq()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want it to mention %q", tc.p, err, tc.want)
		}
	}
}

func TestRotatePreservesNormAndMatchesAngle(t *testing.T) {
	tab, err := NewTable(Params{Dim: 4, Theta: 100}, 10)
	if err != nil {
		t.Fatal(err)
	}
	x := []float32{1, 0, 0, 1} // pair 0 = (1, 0), pair 1 = (0, 1)
	tab.Rotate(x, 3)
	// pair 0 turns by 3·1 rad, pair 1 (ω = 100^(-1/2) = 0.1) by 0.3 rad.
	want := []float64{math.Cos(3), -math.Sin(0.3), math.Sin(3), math.Cos(0.3)}
	for i := range x {
		if math.Abs(float64(x[i])-want[i]) > 1e-6 {
			t.Fatalf("rotated %v, want %v", x, want)
		}
	}
}
