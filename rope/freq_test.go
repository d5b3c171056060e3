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

func TestNewTableFromInvFreq(t *testing.T) {
	p := Params{Dim: 8, Theta: 10000, Scaling: Scaling{Type: "yarn", Factor: 4, OriginalMaxPositionEmbeddings: 64}}
	inv, attn, err := p.InvFreq()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		inv     []float64
		attn    float64
		maxPos  int
		wantErr string
	}{
		{"same as NewTable", inv, attn, 16, ""},
		{"custom frequencies", []float64{0.5, 0.25, 2, 0}, 1, 16, ""},
		{"negative length", inv, attn, -1, "negative table length"},
		{"no frequencies", nil, 1, 4, "no inverse frequencies"},
		{"NaN frequency", []float64{1, math.NaN()}, 1, 4, "inverse frequency 1"},
		{"infinite factor", inv, math.Inf(1), 4, "attention factor"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := NewTableFromInvFreq(tc.inv, tc.attn, tc.maxPos)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Len() != tc.maxPos {
				t.Errorf("Len %d, want %d", got.Len(), tc.maxPos)
			}
			for pos := range tc.maxPos {
				for j, f := range tc.inv {
					wc, ws := tc.attn*math.Cos(float64(pos)*f), tc.attn*math.Sin(float64(pos)*f)
					if math.Abs(float64(got.cos[pos*len(tc.inv)+j])-wc) > 1e-6 || math.Abs(float64(got.sin[pos*len(tc.inv)+j])-ws) > 1e-6 {
						t.Fatalf("pos %d pair %d: cos/sin %v/%v, want %v/%v", pos, j, got.cos[pos*len(tc.inv)+j], got.sin[pos*len(tc.inv)+j], wc, ws)
					}
				}
			}
		})
	}
	// NewTable is NewTableFromInvFreq of Params.InvFreq.
	a, _ := NewTable(p, 16)
	b, _ := NewTableFromInvFreq(inv, attn, 16)
	for i := range a.cos {
		if a.cos[i] != b.cos[i] || a.sin[i] != b.sin[i] {
			t.Fatalf("NewTable and NewTableFromInvFreq differ at %d", i)
		}
	}
}

// RotateInterleaved is transformers' de-interleave → rotate-half, with the
// result interleaved back: permute, Rotate, unpermute.
func TestRotateInterleavedEqualsPermutedRotate(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Params
		pos  int
	}{
		{"dim 2", Params{Dim: 2, Theta: 10000}, 5},
		{"dim 8", Params{Dim: 8, Theta: 10000}, 7},
		{"dim 16 yarn", Params{Dim: 16, Theta: 10000, Scaling: Scaling{Type: "yarn", Factor: 4, OriginalMaxPositionEmbeddings: 32}}, 31},
		{"position 0", Params{Dim: 8, Theta: 500}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab, err := NewTable(tc.p, 32)
			if err != nil {
				t.Fatal(err)
			}
			d, half := tc.p.Dim, tc.p.Dim/2
			x := make([]float32, d)
			for i := range x {
				x[i] = float32(math.Sin(float64(3*i+1))) + 0.5
			}
			// [x0, x1, x2, x3, …] → [x0, x2, …, x1, x3, …]
			perm := make([]float32, d)
			for j := range half {
				perm[j], perm[half+j] = x[2*j], x[2*j+1]
			}
			tab.Rotate(perm, tc.pos)
			want := make([]float32, d)
			for j := range half {
				want[2*j], want[2*j+1] = perm[j], perm[half+j]
			}
			got := append([]float32(nil), x...)
			tab.RotateInterleaved(got, tc.pos)
			for i := range got {
				if got[i] != want[i] {
					t.Fatalf("RotateInterleaved %v, want %v", got, want)
				}
			}
		})
	}
}
