package kernels

import "math"

// expf is e^x in float32 (Cephes' expf: relative error about 2e-7), several
// times faster than float64 math.Exp; the portable twin of the vector code.
func expf(x float32) float32 {
	x = min(max(x, -103), 88.37626)
	n := float32(math.Floor(float64(x*1.442695040888963 + 0.5)))
	r := x - n*0.693359375
	r -= n * -2.12194440e-4
	p := float32(1.9875691500e-4)
	p = p*r + 1.3981999507e-3
	p = p*r + 8.3334519073e-3
	p = p*r + 4.1665795894e-2
	p = p*r + 1.6666665459e-1
	p = p*r + 5.0000001201e-1
	p = p*r*r + r + 1
	// 2^n in two steps, so that n down to -149 (subnormal results) works.
	ni := int32(n)
	if ni < -126 {
		return p * math.Float32frombits(uint32(ni+127+64)<<23) * 0x1p-64
	}
	return p * math.Float32frombits(uint32(ni+127)<<23)
}
