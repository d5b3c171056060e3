package rope

import (
	"fmt"
	"math"
	"slices"
	"sort"

	"gonum.org/v1/gonum/mat"
)

// Decoupling methods: how the RoPE part of the keys is chosen.
const (
	// MethodRoRoPE rotates the keys of all KV heads, frequency band by
	// frequency band, into principal components and keeps RoPE on the
	// strongest (TransMLA's RoRoPE, with FreqFold).
	MethodRoRoPE = "rorope"
	// Method2Norm keeps RoPE on the (head, frequency) pair of each band whose
	// query and key norms have the largest product (MHA2MLA's partial RoPE).
	Method2Norm = "2norm"
	// MethodHigh keeps the highest frequency of each band, on the KV head
	// with the largest norm product.
	MethodHigh = "high"
	// MethodUniform keeps the highest frequency of each band on KV heads
	// taken in turn; it needs no statistics.
	MethodUniform = "uniform"
)

// Methods lists the decoupling methods.
func Methods() []string {
	return []string{MethodRoRoPE, Method2Norm, MethodHigh, MethodUniform}
}

// Decoupling is an orthogonal change of basis of one layer's key space (the
// KVHeads·HeadDim pre-RoPE key dims of all KV heads, each head in the
// rotate-half layout) that splits it into RoPE rows, which keep their
// rotation, and position-free rows, which lose it.
//
// Scores are preserved by applying the same rows to each query head embedded
// in the key space; the approximation is that the position-free rows are no
// longer rotated and that the RoPE rows rotate at their slot's frequency.
type Decoupling struct {
	// KeyDim is KVHeads·HeadDim, the width of every row.
	KeyDim int
	// Rope holds RopeDim rows of KeyDim, row-major: rows 2m and 2m+1 are
	// the two halves of rotation pair m (DeepSeek's interleaved layout).
	Rope []float64
	// Nope holds the KeyDim−RopeDim position-free rows.
	Nope []float64
	// InvFreq is the frequency of each of the RopeDim/2 pairs.
	InvFreq []float64
	// NopeInvFreq is, for each position-free row, the energy-weighted mean
	// source frequency of its component: the rotation it no longer gets.
	NopeInvFreq []float64
}

// RopeDim is the number of RoPE rows.
func (d *Decoupling) RopeDim() int { return len(d.Rope) / d.KeyDim }

// NopeDim is the number of position-free rows.
func (d *Decoupling) NopeDim() int { return len(d.Nope) / d.KeyDim }

// Moments are second moments of one layer's projections on calibration
// data (or their weight-only stand-ins).
type Moments struct {
	// Key is E[k kᵀ] of the pre-RoPE keys of all KV heads, KeyDim×KeyDim.
	Key []float64
	// Query holds, for each KV head g, Σ over its query heads of E[q qᵀ],
	// HeadDim×HeadDim each, concatenated.
	Query []float64
}

// Options selects the decoupling.
type Options struct {
	// Method is one of Methods(); "" means MethodRoRoPE.
	Method string
	// RopeDim is d_r: even, at most HeadDim and dividing it.
	RopeDim int
	// FreqFold is the number of adjacent frequencies whose components are
	// rotated together (RoRoPE only): a multiple of HeadDim/RopeDim dividing
	// HeadDim/2; 0 means HeadDim/RopeDim, the smallest.
	FreqFold int
}

// Decouple chooses the RoPE rows of a layer whose heads rotate with source
// (Dim = HeadDim) and which has kvHeads KV heads.
func Decouple(source Params, kvHeads int, opts Options, m Moments) (*Decoupling, error) {
	d := source.Dim
	dr := opts.RopeDim
	if dr <= 0 || dr%2 != 0 || dr > d || d%dr != 0 {
		return nil, fmt.Errorf("rope dim %d must be even, positive and divide head_dim %d", dr, d)
	}
	keyDim := kvHeads * d
	if len(m.Key) != keyDim*keyDim || len(m.Query) != kvHeads*d*d {
		return nil, fmt.Errorf("rope: moments of size %d and %d, want %d and %d", len(m.Key), len(m.Query), keyDim*keyDim, kvHeads*d*d)
	}
	target := source
	target.Dim = dr
	slotFreq, _, err := target.InvFreq()
	if err != nil {
		return nil, err
	}
	b := newBuilder(d, kvHeads, slotFreq)
	if b.srcFreq, _, err = source.InvFreq(); err != nil {
		return nil, err
	}
	c := d / dr // source frequencies per RoPE slot
	method := opts.Method
	if method == "" {
		method = MethodRoRoPE
	}
	switch method {
	case MethodRoRoPE:
		fold := opts.FreqFold
		if fold == 0 {
			fold = c
		}
		if fold%c != 0 || (d/2)%fold != 0 {
			return nil, fmt.Errorf("freqfold %d must be a multiple of head_dim/rope_dim = %d and divide head_dim/2 = %d", fold, c, d/2)
		}
		if err := b.rorope(m, fold, fold/c); err != nil {
			return nil, err
		}
	case Method2Norm, MethodHigh, MethodUniform:
		if opts.FreqFold != 0 {
			return nil, fmt.Errorf("freqfold applies to %s only, not %s", MethodRoRoPE, method)
		}
		if err := b.partial(m, c, method); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unknown rope method %q (known: %v)", method, Methods())
	}
	return b.finish(), nil
}

// Exact keeps RoPE on every key dim at its own frequency: the identity
// change of basis, the anchor that checks the rest of the conversion.
// Its frequencies repeat the source's per KV head, so no file format
// stores it.
func Exact(source Params, kvHeads int) (*Decoupling, error) {
	inv, _, err := source.InvFreq()
	if err != nil {
		return nil, err
	}
	d := source.Dim
	b := newBuilder(d, kvHeads, nil)
	for g := range kvHeads {
		for j := range d / 2 {
			b.addRope(b.unitPair(g, j), inv[j])
		}
	}
	return b.finish(), nil
}

// component is a unit vector over (KV head, frequency) pairs; the same
// coefficients act on the real halves (dim j) and imaginary halves
// (dim j+d/2) of every head. Its terms are kept in a fixed order (a slice,
// not a map) so that sums over them, and so the output, are reproducible
// to the bit.
type component []term

// term is one coefficient of a component: pair (g, j) is KV head g,
// frequency j.
type term struct {
	pair [2]int
	v    float64
}

type builder struct {
	d, kvHeads int
	srcFreq    []float64
	slotFreq   []float64
	rope, nope []component
	freqs      []float64
}

func newBuilder(d, kvHeads int, slotFreq []float64) *builder {
	return &builder{d: d, kvHeads: kvHeads, slotFreq: slotFreq}
}

func (b *builder) unitPair(g, j int) component { return component{{[2]int{g, j}, 1}} }

func (b *builder) addRope(c component, freq float64) {
	b.rope = append(b.rope, c)
	b.freqs = append(b.freqs, freq)
}

// pairMoment is the moment of components over (head, frequency) pairs:
// the real and imaginary halves summed, which a common rotation leaves
// unchanged.
func (b *builder) pairMoment(mom []float64, stride int, pairs [][2]int, offset func(g int) int) *mat.SymDense {
	n := len(pairs)
	out := mat.NewSymDense(n, nil)
	h := b.d / 2
	for a, pa := range pairs {
		for c := a; c < n; c++ {
			pc := pairs[c]
			ia, ic := offset(pa[0])+pa[1], offset(pc[0])+pc[1]
			v := mom[ia*stride+ic] + mom[(ia+h)*stride+ic+h]
			out.SetSym(a, c, v)
		}
	}
	return out
}

// rorope runs the per-band PCA: bands of fold frequencies, keep components
// per band.
func (b *builder) rorope(m Moments, fold, keep int) error {
	d, keyDim := b.d, b.kvHeads*b.d
	for start := 0; start < d/2; start += fold {
		var pairs [][2]int
		for g := range b.kvHeads {
			for j := start; j < start+fold; j++ {
				pairs = append(pairs, [2]int{g, j})
			}
		}
		mk := b.pairMoment(m.Key, keyDim, pairs, func(g int) int { return g * d })
		var eig mat.EigenSym
		if !eig.Factorize(mk, true) {
			return fmt.Errorf("rope: eigendecomposition failed for frequencies %d..%d", start, start+fold-1)
		}
		var vecs mat.Dense
		eig.VectorsTo(&vecs)
		// EigenSym sorts ascending: the strongest components come last.
		n := len(pairs)
		var kept []component
		for k := n - 1; k >= 0; k-- {
			var comp component
			for i, p := range pairs {
				if v := vecs.At(i, k); v != 0 {
					comp = append(comp, term{p, v})
				}
			}
			if k >= n-keep {
				kept = append(kept, comp)
			} else {
				b.nope = append(b.nope, comp)
			}
		}
		// Slots are ordered by decreasing frequency: give the slot of higher
		// frequency to the component whose energy sits at higher frequency.
		sort.SliceStable(kept, func(x, y int) bool { return meanFreqIndex(kept[x]) < meanFreqIndex(kept[y]) })
		firstSlot := start * keep / fold
		for i, comp := range kept {
			b.addRope(comp, b.slotFreq[firstSlot+i])
		}
	}
	return nil
}

func (b *builder) meanFreq(c component) float64 {
	var s, w float64
	for _, t := range c {
		s += t.v * t.v * b.srcFreq[t.pair[1]]
		w += t.v * t.v
	}
	return s / w
}

func meanFreqIndex(c component) float64 {
	var s, w float64
	for _, t := range c {
		s += t.v * t.v * float64(t.pair[1])
		w += t.v * t.v
	}
	return s / w
}

// partial keeps one (head, frequency) pair per slot, from the band of c
// frequencies the slot stands for; every other pair loses its rotation.
func (b *builder) partial(m Moments, c int, method string) error {
	d, keyDim, h := b.d, b.kvHeads*b.d, b.d/2
	norm := func(g, j int) float64 {
		i := g*d + j
		k := m.Key[i*keyDim+i] + m.Key[(i+h)*keyDim+i+h]
		q := m.Query[g*d*d+j*d+j] + m.Query[g*d*d+(j+h)*d+j+h]
		return math.Sqrt(math.Max(k, 0) * math.Max(q, 0))
	}
	kept := map[[2]int]bool{}
	for slot := range b.slotFreq {
		best, bestScore := [2]int{-1, -1}, math.Inf(-1)
		for g := range b.kvHeads {
			for j := slot * c; j < (slot+1)*c; j++ {
				var s float64
				switch method {
				case Method2Norm:
					s = norm(g, j)
				case MethodHigh:
					if j != slot*c {
						continue
					}
					s = norm(g, j)
				case MethodUniform:
					if j != slot*c || g != slot%b.kvHeads {
						continue
					}
				}
				if s > bestScore {
					best, bestScore = [2]int{g, j}, s
				}
			}
		}
		if best[0] < 0 {
			return fmt.Errorf("rope: no finite query/key norm for RoPE slot %d (non-finite calibration statistics?)", slot)
		}
		kept[best] = true
		b.addRope(b.unitPair(best[0], best[1]), b.slotFreq[slot])
	}
	for g := range b.kvHeads {
		for j := range d / 2 {
			if !kept[[2]int{g, j}] {
				b.nope = append(b.nope, b.unitPair(g, j))
			}
		}
	}
	return nil
}

// finish lays the components out as rows: RoPE pairs interleaved, then
// the position-free rows, real halves of all components before imaginary
// ones.
func (b *builder) finish() *Decoupling {
	d, keyDim, h := b.d, b.kvHeads*b.d, b.d/2
	row := func(c component, imag bool) []float64 {
		r := make([]float64, keyDim)
		off := 0
		if imag {
			off = h
		}
		for _, t := range c {
			r[t.pair[0]*d+t.pair[1]+off] = t.v
		}
		return r
	}
	out := &Decoupling{KeyDim: keyDim, InvFreq: slices.Clone(b.freqs)}
	for _, c := range b.rope {
		out.Rope = append(out.Rope, row(c, false)...)
		out.Rope = append(out.Rope, row(c, true)...)
	}
	for _, c := range b.nope {
		out.Nope = append(out.Nope, row(c, false)...)
		out.NopeInvFreq = append(out.NopeInvFreq, b.meanFreq(c))
	}
	for _, c := range b.nope {
		out.Nope = append(out.Nope, row(c, true)...)
		out.NopeInvFreq = append(out.NopeInvFreq, b.meanFreq(c))
	}
	return out
}
