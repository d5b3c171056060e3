package safetensors

import (
	"encoding/binary"
	"fmt"
	"math"

	st "github.com/nlpodyssey/safetensors"
)

// DType identifies the element type of a stored tensor. It is the
// github.com/nlpodyssey/safetensors type, so values interoperate with that
// library.
type DType = st.DType

// Element types of the safetensors format.
const (
	BOOL = st.BOOL // boolean, one byte
	U8   = st.U8   // unsigned 8-bit integer
	I8   = st.I8   // signed 8-bit integer
	I16  = st.I16  // signed 16-bit integer
	U16  = st.U16  // unsigned 16-bit integer
	F16  = st.F16  // IEEE 754 half precision
	BF16 = st.BF16 // bfloat16: the upper half of a float32
	I32  = st.I32  // signed 32-bit integer
	U32  = st.U32  // unsigned 32-bit integer
	F32  = st.F32  // IEEE 754 single precision
	F64  = st.F64  // IEEE 754 double precision
	I64  = st.I64  // signed 64-bit integer
	U64  = st.U64  // unsigned 64-bit integer
)

// dtypeSize returns the element size of dt in bytes, and false for values
// outside the library's table, whose Size and String methods would panic.
// The library declares U64 last.
func dtypeSize(dt DType) (int64, bool) {
	if dt > U64 {
		return 0, false
	}
	return int64(dt.Size()), true
}

// dtypeName formats dt for error messages without panicking on invalid values.
func dtypeName(dt DType) string {
	if dt > U64 {
		return fmt.Sprintf("DType(%d)", uint8(dt))
	}
	return dt.String()
}

// decodable reports whether DecodeToFloat32 accepts dt.
func decodable(dt DType) bool {
	switch dt {
	case BF16, F16, F32, F64, I64:
		return true
	}
	return false
}

// encodable reports whether EncodeFloat32 accepts dt. Integer dtypes are
// excluded because converting float32 weights to integers has no single
// right rounding.
func encodable(dt DType) bool {
	switch dt {
	case BF16, F16, F32, F64:
		return true
	}
	return false
}

// BF16ToFloat32 converts a bfloat16 bit pattern to float32. The conversion
// is exact: bfloat16 is the upper half of a float32.
func BF16ToFloat32(h uint16) float32 {
	return math.Float32frombits(uint32(h) << 16)
}

// Float32ToBF16 converts f to the nearest bfloat16, rounding ties to even.
// Values beyond the bfloat16 range become infinities. NaN stays NaN: the
// sign and upper payload bits are kept, so every bfloat16 NaN survives a
// round trip through float32, and a payload that would truncate to zero,
// turning the NaN into an infinity, gets the quiet bit instead.
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		h := uint16(b >> 16)
		if h&0x7f == 0 {
			h |= 0x40
		}
		return h
	}
	// Adding 0x7fff rounds up when the discarded half exceeds one half ulp;
	// adding the kept low bit as well turns exact ties toward the even
	// neighbour. A carry into the exponent is the correct rounding result,
	// including overflow to infinity.
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// F16ToFloat32 converts an IEEE 754 half-precision bit pattern to float32.
// The conversion is exact for every input, including subnormals,
// infinities and NaN payloads.
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp != 0:
		return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
	case mant == 0:
		return math.Float32frombits(sign)
	}
	// A subnormal half is mant×2⁻²⁴; every such value is a normal float32.
	// Shift the leading one into the implicit bit position, lowering the
	// exponent once per shift.
	e := uint32(127 - 15 + 1)
	for mant&0x400 == 0 {
		mant <<= 1
		e--
	}
	return math.Float32frombits(sign | e<<23 | (mant&0x3ff)<<13)
}

// Float32ToF16 converts f to the nearest IEEE 754 half-precision value,
// rounding ties to even. Magnitudes that round beyond 65504 become
// infinities, small magnitudes become subnormals or signed zeros. NaN
// stays NaN, keeping the sign and upper payload bits as Float32ToBF16 does.
func Float32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant != 0 {
			m := uint16(mant >> 13)
			if m == 0 {
				m = 0x200
			}
			return sign | 0x7c00 | m
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15 // biased half exponent
	switch {
	case e >= 0x1f:
		return sign | 0x7c00
	case e <= 0:
		// Subnormal half: the result is the full significand scaled down
		// to units of 2⁻²⁴. Magnitudes below 2⁻²⁵, half the smallest
		// subnormal, round to zero.
		if e < -10 {
			return sign
		}
		full := mant | 0x800000
		shift := uint(14 - e)
		return sign | uint16(roundShift(full, shift))
	}
	// Rounding may carry into the exponent field; that is the correct
	// encoding of the next binade, and of infinity after 65504.
	h := uint32(e)<<10 | mant>>13
	return sign | uint16(roundTiesEven(h, mant&0x1fff, 0x1000))
}

// roundShift returns x>>shift rounded to nearest, ties to even.
func roundShift(x uint32, shift uint) uint32 {
	return roundTiesEven(x>>shift, x&(1<<shift-1), 1<<(shift-1))
}

// roundTiesEven rounds the truncated value q up by one when the discarded
// remainder rem exceeds half, or equals it and q is odd.
func roundTiesEven(q, rem, half uint32) uint32 {
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return q
}

// EncodeFloat32 encodes src into dst as little-endian elements of dtype dt,
// rounding to nearest with ties to even where dt is narrower than float32.
// dt must be BF16, F16, F32 or F64 and dst must hold len(src) elements;
// like encoding/binary's Put functions, it panics otherwise, because both
// are programming errors rather than data errors.
func EncodeFloat32(dst []byte, src []float32, dt DType) {
	if !encodable(dt) {
		panic(fmt.Sprintf("safetensors: EncodeFloat32 to %s", dtypeName(dt)))
	}
	size, _ := dtypeSize(dt)
	if int64(len(dst)) < int64(len(src))*size {
		panic(fmt.Sprintf("safetensors: EncodeFloat32 of %d %s elements into %d bytes", len(src), dt, len(dst)))
	}
	switch dt {
	case BF16:
		for i, v := range src {
			binary.LittleEndian.PutUint16(dst[2*i:], Float32ToBF16(v))
		}
	case F16:
		for i, v := range src {
			binary.LittleEndian.PutUint16(dst[2*i:], Float32ToF16(v))
		}
	case F32:
		for i, v := range src {
			binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(v))
		}
	case F64:
		for i, v := range src {
			binary.LittleEndian.PutUint64(dst[8*i:], math.Float64bits(float64(v)))
		}
	}
}

// DecodeToFloat32 decodes the little-endian elements of dtype dt in src into
// dst. BF16, F16 and F32 convert exactly; F64 and I64 round to the nearest
// float32. len(src) must be len(dst) times the element size.
func DecodeToFloat32(dst []float32, src []byte, dt DType) error {
	if !decodable(dt) {
		return fmt.Errorf("decode %s as float32: %w", dtypeName(dt), ErrUnsupportedDType)
	}
	size, _ := dtypeSize(dt)
	if int64(len(src)) != int64(len(dst))*size {
		return fmt.Errorf("decode %d bytes of %s into %d float32 values: %w", len(src), dt, len(dst), ErrLength)
	}
	switch dt {
	case BF16:
		decodeBF16(dst, src)
	case F16:
		for i := range dst {
			dst[i] = F16ToFloat32(binary.LittleEndian.Uint16(src[2*i:]))
		}
	case F32:
		decodeF32(dst, src)
	case F64:
		for i := range dst {
			dst[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(src[8*i:])))
		}
	case I64:
		for i := range dst {
			dst[i] = float32(int64(binary.LittleEndian.Uint64(src[8*i:])))
		}
	}
	return nil
}

// decodeBF16 is the BF16 case of DecodeToFloat32. Checkpoint loading spends
// most of its time here, so it converts eight elements per 16-byte step:
// two 64-bit loads and re-slicing both buffers let the compiler drop the
// per-element bounds checks, about twice as fast as the one-element loop.
func decodeBF16(dst []float32, src []byte) {
	src = src[:2*len(dst)]
	for len(dst) >= 8 && len(src) >= 16 {
		v := binary.LittleEndian.Uint64(src)
		w := binary.LittleEndian.Uint64(src[8:])
		dst[0] = math.Float32frombits(uint32(v) << 16)
		dst[1] = math.Float32frombits(uint32(v>>16) << 16)
		dst[2] = math.Float32frombits(uint32(v>>32) << 16)
		dst[3] = math.Float32frombits(uint32(v>>48) << 16)
		dst[4] = math.Float32frombits(uint32(w) << 16)
		dst[5] = math.Float32frombits(uint32(w>>16) << 16)
		dst[6] = math.Float32frombits(uint32(w>>32) << 16)
		dst[7] = math.Float32frombits(uint32(w>>48) << 16)
		dst, src = dst[8:], src[16:]
	}
	for i := range dst {
		dst[i] = BF16ToFloat32(binary.LittleEndian.Uint16(src[2*i:]))
	}
}

// decodeF32 is the F32 case of DecodeToFloat32, unrolled like decodeBF16
// for the same reason: four elements per 16-byte step.
func decodeF32(dst []float32, src []byte) {
	src = src[:4*len(dst)]
	for len(dst) >= 4 && len(src) >= 16 {
		v := binary.LittleEndian.Uint64(src)
		w := binary.LittleEndian.Uint64(src[8:])
		dst[0] = math.Float32frombits(uint32(v))
		dst[1] = math.Float32frombits(uint32(v >> 32))
		dst[2] = math.Float32frombits(uint32(w))
		dst[3] = math.Float32frombits(uint32(w >> 32))
		dst, src = dst[4:], src[16:]
	}
	for i := range dst {
		dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
	}
}

// FirstNonFinite returns the index of the first NaN or infinite element of
// src, stored values of dtype dt, or -1 when every element is finite or dt
// is not a float dtype (BF16, F16, F32, F64). It tests the exponent bits
// without decoding, a word at a time, so checking a tensor that is copied
// as stored costs far less than decoding it.
func FirstNonFinite(src []byte, dt DType) int {
	// An element is non-finite when its exponent bits are all ones: adding
	// the exponent's lowest bit to the masked element then carries into
	// the sign position, lane by lane, without crossing into the next.
	var exp, low, sign uint64
	var size int
	switch dt {
	case BF16:
		exp, low, sign, size = 0x7f80_7f80_7f80_7f80, 0x0080_0080_0080_0080, 0x8000_8000_8000_8000, 2
	case F16:
		exp, low, sign, size = 0x7c00_7c00_7c00_7c00, 0x0400_0400_0400_0400, 0x8000_8000_8000_8000, 2
	case F32:
		exp, low, sign, size = 0x7f800000_7f800000, 0x00800000_00800000, 0x80000000_80000000, 4
	case F64:
		exp, low, sign, size = 0x7ff0_0000_0000_0000, 0x0010_0000_0000_0000, 0, 8
	default:
		return -1
	}
	n := len(src) / size
	i := 0
	if sign != 0 {
		for ; i+8 <= n*size; i += 8 {
			w := binary.LittleEndian.Uint64(src[i:])
			if ((w&exp)+low)&sign != 0 {
				break
			}
		}
	}
	one := exp // the mask of a single element
	if size < 8 {
		one &= 1<<(8*size) - 1
	}
	for k := i / size; k < n; k++ {
		var bits uint64
		switch size {
		case 2:
			bits = uint64(binary.LittleEndian.Uint16(src[k*size:]))
		case 4:
			bits = uint64(binary.LittleEndian.Uint32(src[k*size:]))
		default:
			bits = binary.LittleEndian.Uint64(src[k*size:])
		}
		if bits&one == one {
			return k
		}
	}
	return -1
}
