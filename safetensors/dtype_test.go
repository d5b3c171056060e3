package safetensors

import (
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"testing"
)

// refF16 returns the value of the half-precision pattern h, computed from
// the IEEE 754 definition rather than by bit manipulation: subnormals are
// m×2⁻²⁴, normals (1024+m)×2^(e-25).
func refF16(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	e := int(h>>10) & 0x1f
	m := float64(h & 0x3ff)
	switch e {
	case 0:
		return sign * math.Ldexp(m, -24)
	case 0x1f:
		if m != 0 {
			return math.NaN()
		}
		return sign * math.Inf(1)
	}
	return sign * math.Ldexp(1024+m, e-25)
}

// refRound rounds the non-negative x to the nearest of the increasing
// finite values value(0), value(1), … value(last), ties to the even index.
// Index last+1 stands for infinity, whose rounding threshold is the value
// value(last+1) would have if the format continued; that value is next.
func refRound(x float64, last int, value func(int) float64, next float64) int {
	lo, hi := 0, last+1 // invariant: value(lo) <= x < value(hi), with value(last+1) = next
	if x >= next {
		return last + 1
	}
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		if value(mid) <= x {
			lo = mid
		} else {
			hi = mid
		}
	}
	vhi := next
	if hi <= last {
		vhi = value(hi)
	}
	// Both candidates are within a factor of two of x, so these
	// differences are exact in float64.
	dlo, dhi := x-value(lo), vhi-x
	switch {
	case dlo < dhi:
		return lo
	case dhi < dlo:
		return hi
	case lo%2 == 0:
		return lo
	}
	return hi
}

// refFloat32ToF16 is the reference rounding to half precision: nearest of
// all finite halves, ties to even, beyond 65504 + half an ulp to infinity.
func refFloat32ToF16(f float32) uint16 {
	x := float64(f)
	var sign uint16
	if math.Signbit(x) {
		sign, x = 0x8000, -x
	}
	value := func(i int) float64 { return refF16(uint16(i)) }
	// The largest finite half is 0x7bff = 65504; the next value the
	// format would have, 2¹⁶, sets the overflow threshold at 65520.
	return sign | uint16(refRound(x, 0x7bff, value, 65536))
}

// refFloat32ToBF16 is the reference rounding to bfloat16: nearest of the
// bfloat16 values (float32 values with zero low half), ties to even.
func refFloat32ToBF16(f float32) uint16 {
	x := float64(f)
	var sign uint16
	if math.Signbit(x) {
		sign, x = 0x8000, -x
	}
	value := func(i int) float64 { return float64(math.Float32frombits(uint32(i) << 16)) }
	// The largest finite bfloat16 is 0x7f7f; the next value would be 2¹²⁸.
	return sign | uint16(refRound(x, 0x7f7f, value, math.Ldexp(1, 128)))
}

func TestFloat32ToBF16(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   uint32 // float32 bits
		want uint16
	}{
		{"one", 0x3f800000, 0x3f80},
		{"tie to even below", 0x3f808000, 0x3f80}, // 1+2⁻⁸, halfway between 1 and 1+2⁻⁷
		{"tie to even above", 0x3f818000, 0x3f82}, // 1+3·2⁻⁸, halfway, 0x3f81 is odd
		{"just above tie", 0x3f808001, 0x3f81},
		{"just below tie", 0x3f807fff, 0x3f80},
		{"negative tie", 0xbf808000, 0xbf80},
		{"max finite", 0x7f7f0000, 0x7f7f},
		{"below overflow tie", 0x7f7f7fff, 0x7f7f},
		{"overflow tie to inf", 0x7f7f8000, 0x7f80}, // halfway to 2¹²⁸, 0x7f7f is odd
		{"max float32 to inf", 0x7f7fffff, 0x7f80},
		{"negative overflow", 0xff7fffff, 0xff80},
		{"inf", 0x7f800000, 0x7f80},
		{"-inf", 0xff800000, 0xff80},
		{"-0", 0x80000000, 0x8000},
		{"smallest subnormal to zero", 0x00000001, 0x0000},
		{"subnormal tie to even zero", 0x00008000, 0x0000},
		{"subnormal just above tie", 0x00008001, 0x0001},
		{"subnormal tie up", 0x00018000, 0x0002},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Float32ToBF16(math.Float32frombits(tc.in)); got != tc.want {
				t.Errorf("Float32ToBF16(%#08x) = %#04x, want %#04x", tc.in, got, tc.want)
			}
		})
	}
}

func TestFloat32ToBF16NaN(t *testing.T) {
	// 0x7f800001 has payload bits only below the kept half; plain
	// truncation would turn it into infinity.
	for _, bits := range []uint32{0x7fc00000, 0x7f800001, 0xff800001, 0x7fffffff, 0x7f80ffff} {
		got := Float32ToBF16(math.Float32frombits(bits))
		if !math.IsNaN(float64(BF16ToFloat32(got))) {
			t.Errorf("Float32ToBF16(%#08x) = %#04x, not NaN", bits, got)
		}
		if got>>15 != uint16(bits>>31) {
			t.Errorf("Float32ToBF16(%#08x) = %#04x lost the sign", bits, got)
		}
	}
}

func TestFloat32ToF16(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   float32
		want uint16
	}{
		{"one", 1, 0x3c00},
		{"-2", -2, 0xc000},
		{"tie to even below", 1 + 1.0/2048, 0x3c00},             // halfway between 1 and 1+2⁻¹⁰
		{"tie to even above", 1 + 3.0/2048, 0x3c02},             // halfway, 0x3c01 is odd
		{"just above tie", 1 + 1.0/2048 + 1.0/8388608, 0x3c01},  // plus 2⁻²³
		{"just below tie", 1 + 1.0/2048 - 1.0/16777216, 0x3c00}, // minus 2⁻²⁴
		{"max finite", 65504, 0x7bff},
		{"below overflow tie", 65519, 0x7bff},
		{"overflow tie to inf", 65520, 0x7c00}, // halfway to 2¹⁶, 0x7bff is odd
		{"overflow", 65536, 0x7c00},
		{"large", 1e30, 0x7c00},
		{"negative overflow", -65520, 0xfc00},
		{"inf", float32(math.Inf(1)), 0x7c00},
		{"-inf", float32(math.Inf(-1)), 0xfc00},
		{"zero", 0, 0x0000},
		{"-0", float32(math.Copysign(0, -1)), 0x8000},
		{"min normal", 1.0 / 16384, 0x0400},                    // 2⁻¹⁴
		{"min subnormal", 1.0 / 16777216, 0x0001},              // 2⁻²⁴
		{"max subnormal", 1023.0 / 16777216, 0x03ff},           // 1023·2⁻²⁴
		{"subnormal tie to even zero", 1.0 / 33554432, 0x0000}, // 2⁻²⁵, halfway between 0 and 2⁻²⁴
		{"subnormal just above zero tie", 1.0/33554432 + 1.0/(1<<40), 0x0001},
		{"subnormal tie up", 3.0 / 33554432, 0x0002},               // 3·2⁻²⁵, halfway, 0x0001 is odd
		{"subnormal tie to min normal", 2047.0 / 33554432, 0x0400}, // halfway between 0x03ff and 0x0400
		{"negative subnormal", -5.0 / 16777216, 0x8005},
		{"underflow", 1.0 / (1 << 26), 0x0000},
		{"negative underflow", -1.0 / (1 << 26), 0x8000},
		{"float32 subnormal", math.Float32frombits(1), 0x0000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Float32ToF16(tc.in); got != tc.want {
				t.Errorf("Float32ToF16(%g) = %#04x, want %#04x", tc.in, got, tc.want)
			}
		})
	}
}

func TestFloat32ToF16NaN(t *testing.T) {
	for _, bits := range []uint32{0x7fc00000, 0x7f800001, 0xff800001, 0x7fffffff} {
		got := Float32ToF16(math.Float32frombits(bits))
		if got&0x7c00 != 0x7c00 || got&0x3ff == 0 {
			t.Errorf("Float32ToF16(%#08x) = %#04x, not NaN", bits, got)
		}
		if got>>15 != uint16(bits>>31) {
			t.Errorf("Float32ToF16(%#08x) = %#04x lost the sign", bits, got)
		}
	}
}

// TestF16ToFloat32All checks every half-precision pattern against the
// definition, and that converting back returns the same pattern.
func TestF16ToFloat32All(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		got := F16ToFloat32(h)
		want := refF16(h)
		if math.IsNaN(want) {
			if !math.IsNaN(float64(got)) {
				t.Fatalf("F16ToFloat32(%#04x) = %g, want NaN", h, got)
			}
			if back := Float32ToF16(got); back != h {
				t.Fatalf("NaN payload %#04x came back as %#04x", h, back)
			}
			continue
		}
		if float64(got) != want || math.Signbit(float64(got)) != math.Signbit(want) {
			t.Fatalf("F16ToFloat32(%#04x) = %g, want %g", h, got, want)
		}
		if back := Float32ToF16(got); back != h {
			t.Fatalf("Float32ToF16(F16ToFloat32(%#04x)) = %#04x", h, back)
		}
	}
}

// TestBF16RoundTripAll checks that every non-NaN bfloat16 survives a round
// trip through float32.
func TestBF16RoundTripAll(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		f := BF16ToFloat32(h)
		if math.Float32bits(f) != uint32(h)<<16 {
			t.Fatalf("BF16ToFloat32(%#04x) = %#08x", h, math.Float32bits(f))
		}
		if back := Float32ToBF16(f); back != h {
			t.Fatalf("Float32ToBF16(BF16ToFloat32(%#04x)) = %#04x", h, back)
		}
	}
}

// testFloats returns float32 values concentrated where rounding is
// delicate: near ties of both 16-bit formats, near the half-precision
// overflow and subnormal range, plus random bit patterns.
func testFloats() []float32 {
	r := rand.New(rand.NewPCG(1, 2))
	var fs []float32
	for range 200000 {
		fs = append(fs, math.Float32frombits(r.Uint32()))
	}
	for e := 100; e <= 145; e++ { // float32 exponents spanning the half range
		for range 4000 {
			low := r.Uint32() & 0x7fffff
			switch r.IntN(3) {
			case 0:
				low = low&^0x1fff | 0x1000 + r.Uint32()%3 - 1 // near a half tie
			case 1:
				low = low&^0xffff | 0x8000 + r.Uint32()%3 - 1 // near a bfloat16 tie
			}
			fs = append(fs, math.Float32frombits(uint32(e)<<23|low&0x7fffff|r.Uint32()&0x80000000))
		}
	}
	return fs
}

func TestFloat32ToF16Reference(t *testing.T) {
	for _, f := range testFloats() {
		if math.IsNaN(float64(f)) {
			continue
		}
		if got, want := Float32ToF16(f), refFloat32ToF16(f); got != want {
			t.Fatalf("Float32ToF16(%g = %#08x) = %#04x, want %#04x", f, math.Float32bits(f), got, want)
		}
	}
}

func TestFloat32ToBF16Reference(t *testing.T) {
	for _, f := range testFloats() {
		if math.IsNaN(float64(f)) {
			continue
		}
		if got, want := Float32ToBF16(f), refFloat32ToBF16(f); got != want {
			t.Fatalf("Float32ToBF16(%g = %#08x) = %#04x, want %#04x", f, math.Float32bits(f), got, want)
		}
	}
}

// TestEncodeDecode checks the slice helpers against the scalar conversions
// for every length up to 40, covering the unrolled loops and their tails.
func TestEncodeDecode(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, dt := range []DType{BF16, F16, F32, F64} {
		size, _ := dtypeSize(dt)
		for n := range 41 {
			src := make([]float32, n)
			for i := range src {
				src[i] = float32(r.NormFloat64() * 100)
			}
			buf := make([]byte, int64(n)*size)
			EncodeFloat32(buf, src, dt)
			got := make([]float32, n)
			if err := DecodeToFloat32(got, buf, dt); err != nil {
				t.Fatalf("%s n=%d: %v", dt, n, err)
			}
			for i, v := range src {
				var want float32
				var stored uint64
				switch dt {
				case BF16:
					stored = uint64(binary.LittleEndian.Uint16(buf[2*i:]))
					want = BF16ToFloat32(Float32ToBF16(v))
					if uint16(stored) != Float32ToBF16(v) {
						t.Fatalf("%s n=%d [%d]: stored %#x", dt, n, i, stored)
					}
				case F16:
					stored = uint64(binary.LittleEndian.Uint16(buf[2*i:]))
					want = F16ToFloat32(Float32ToF16(v))
					if uint16(stored) != Float32ToF16(v) {
						t.Fatalf("%s n=%d [%d]: stored %#x", dt, n, i, stored)
					}
				case F32:
					stored = uint64(binary.LittleEndian.Uint32(buf[4*i:]))
					want = v
					if uint32(stored) != math.Float32bits(v) {
						t.Fatalf("%s n=%d [%d]: stored %#x", dt, n, i, stored)
					}
				case F64:
					stored = binary.LittleEndian.Uint64(buf[8*i:])
					want = v
					if stored != math.Float64bits(float64(v)) {
						t.Fatalf("%s n=%d [%d]: stored %#x", dt, n, i, stored)
					}
				}
				if got[i] != want {
					t.Fatalf("%s n=%d [%d]: decoded %g, want %g", dt, n, i, got[i], want)
				}
			}
		}
	}
}

func TestDecodeI64(t *testing.T) {
	in := []int64{0, 1, -1, 1 << 40, -(1 << 53) - 1, math.MaxInt64}
	// float32 rounds 2⁵³+1 to 2⁵³ and MaxInt64 to 2⁶³.
	want := []float32{0, 1, -1, 1 << 40, -(1 << 53), 1 << 63}
	buf := make([]byte, 8*len(in))
	for i, v := range in {
		binary.LittleEndian.PutUint64(buf[8*i:], uint64(v))
	}
	got := make([]float32, len(in))
	if err := DecodeToFloat32(got, buf, I64); err != nil {
		t.Fatal(err)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("[%d] %d decoded as %g, want %g", i, in[i], got[i], want[i])
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	dst := make([]float32, 4)
	if err := DecodeToFloat32(dst, make([]byte, 7), BF16); !errors.Is(err, ErrLength) {
		t.Errorf("short source: got %v, want ErrLength", err)
	}
	for _, dt := range []DType{BOOL, U8, I8, I16, U16, I32, U32, U64, DType(200)} {
		if err := DecodeToFloat32(dst, make([]byte, 32), dt); !errors.Is(err, ErrUnsupportedDType) {
			t.Errorf("%s: got %v, want ErrUnsupportedDType", dtypeName(dt), err)
		}
	}
}

func TestEncodePanics(t *testing.T) {
	for _, tc := range []struct {
		name string
		dst  int
		dt   DType
	}{
		{"integer dtype", 16, I64},
		{"invalid dtype", 16, DType(99)},
		{"short destination", 7, F16},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Error("no panic")
				}
			}()
			EncodeFloat32(make([]byte, tc.dst), make([]float32, 4), tc.dt)
		})
	}
}

// benchDecode measures decoding a 32 MiB-of-output tensor, the order of a
// model's largest weight matrices.
func benchDecode(b *testing.B, dt DType) {
	const n = 8 << 20
	size, _ := dtypeSize(dt)
	src := make([]byte, n*size)
	r := rand.New(rand.NewPCG(5, 6))
	for i := range src {
		src[i] = byte(r.Uint32())
	}
	dst := make([]float32, n)
	b.SetBytes(int64(len(src)))
	for b.Loop() {
		if err := DecodeToFloat32(dst, src, dt); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeBF16(b *testing.B) { benchDecode(b, BF16) }
func BenchmarkDecodeF32(b *testing.B)  { benchDecode(b, F32) }
func BenchmarkDecodeF16(b *testing.B)  { benchDecode(b, F16) }

// FirstNonFinite against decoding every element and testing it: random
// bit patterns with non-finite values planted at chosen places, at lengths
// that end inside and after a word.
func TestFirstNonFinite(t *testing.T) {
	decode := func(b []byte, dt DType, k int) float64 {
		switch dt {
		case BF16:
			return float64(BF16ToFloat32(binary.LittleEndian.Uint16(b[2*k:])))
		case F16:
			return float64(F16ToFloat32(binary.LittleEndian.Uint16(b[2*k:])))
		case F32:
			return float64(math.Float32frombits(binary.LittleEndian.Uint32(b[4*k:])))
		}
		return math.Float64frombits(binary.LittleEndian.Uint64(b[8*k:]))
	}
	// Bit patterns of the largest finite, +Inf and a NaN.
	special := map[DType][3]uint64{
		BF16: {0x7f7f, 0x7f80, 0xffc1},
		F16:  {0x7bff, 0x7c00, 0xfe01},
		F32:  {0x7f7fffff, 0x7f800000, 0xffc00001},
		F64:  {0x7fefffffffffffff, 0x7ff0000000000000, 0xfff8000000000001},
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for _, dt := range []DType{BF16, F16, F32, F64} {
		size := int(dt.Size())
		for _, n := range []int{0, 1, 3, 4, 5, 17, 64, 1001} {
			for _, plant := range []int{-1, 0, n / 2, n - 1} {
				for _, kind := range []int{1, 2} {
					b := make([]byte, n*size)
					for k := range n {
						// Random finite values, and the largest finite one
						// often, to catch a carry that leaks between lanes.
						exp := special[dt][1] // +Inf: the exponent bits
						bits := rng.Uint64()
						if bits&exp == exp {
							bits &^= exp & -exp
						}
						if rng.IntN(3) == 0 {
							bits = special[dt][0] | rng.Uint64()&(1<<(8*size-1))
						}
						put(b[k*size:], bits, size)
					}
					if plant >= 0 && n > 0 {
						put(b[plant*size:], special[dt][kind], size)
					}
					want := -1
					for k := range n {
						if v := decode(b, dt, k); math.IsNaN(v) || math.IsInf(v, 0) {
							want = k
							break
						}
					}
					if got := FirstNonFinite(b, dt); got != want {
						t.Errorf("%s, %d values, planted %d at %d: got %d, want %d", dt, n, kind, plant, got, want)
					}
				}
			}
		}
	}
	if got := FirstNonFinite([]byte{0xff, 0xff, 0xff, 0xff}, I32); got != -1 {
		t.Errorf("integer dtype: got %d, want -1", got)
	}
}

// put stores the low size bytes of bits little-endian in b.
func put(b []byte, bits uint64, size int) {
	for i := range size {
		b[i] = byte(bits >> (8 * i))
	}
}
