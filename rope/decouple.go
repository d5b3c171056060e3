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

// Decoupling is a change of basis of one layer's key space (the
// KVHeads·HeadDim pre-RoPE key dims of all KV heads, each head in the
// rotate-half layout) that splits it into RoPE rows, which keep their
// rotation, and position-free rows, which lose it.
//
// Keys are mapped by the key rows (Rope, Nope) and queries, embedded in the
// key space, by the query rows (QueryRope, QueryNope): the two bases are
// dual (Σ_c query_c key_cᵀ = I), so every score is preserved; the
// approximation is that the position-free rows are no longer rotated and
// that the RoPE rows rotate at their slot's frequency. A key-energy
// decoupling is orthogonal and its query rows are its key rows.
type Decoupling struct {
	// KeyDim is KVHeads·HeadDim, the width of every row.
	KeyDim int
	// Rope holds RopeDim key rows of KeyDim, row-major: rows 2m and 2m+1
	// are the two halves of rotation pair m (DeepSeek's interleaved layout).
	Rope []float64
	// Nope holds the KeyDim−RopeDim position-free key rows: the real
	// halves of every component, then the imaginary halves in the same
	// order.
	Nope []float64
	// QueryRope and QueryNope are the query rows matching Rope and Nope.
	QueryRope, QueryNope []float64
	// InvFreq is the frequency of each of the RopeDim/2 pairs.
	InvFreq []float64
	// NopeFix, when not nil, holds for each query head and each
	// position-free component (in Nope's order) the mean rotation that the
	// component lost, E[R(−ωΔ)] over the head's attention distances Δ:
	// the Fix with which the head should read the component's key.
	NopeFix [][]Fix
}

// Fix is a scaled rotation [[C, S], [−S, C]]: the mean of R(−ωΔ) =
// [[cos ωΔ, sin ωΔ], [−sin ωΔ, cos ωΔ]], the rotation that a score term
// qᵀR(−ωΔ)k between a query and a key Δ positions back loses when the key
// stops rotating. On average over the distances the score is kept best by
// reading the key pair (k_re, k_im) as (C·k_re + S·k_im, −S·k_re + C·k_im).
type Fix struct{ C, S float64 }

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

// Ranking says what RoRoPE's principal components maximise.
const (
	// RankKey ranks components by key energy (TransMLA).
	RankKey = "key"
	// RankScore ranks components by the score variance they carry: the key
	// energy seen through the queries that read it (queries whitened within
	// each band), so a strong key that no query attends to keeps no slot.
	RankScore = "score"
)

// Rankings lists the RoRoPE rankings.
func Rankings() []string { return []string{RankKey, RankScore} }

// Options selects the decoupling.
type Options struct {
	// Method is one of Methods(); "" means MethodRoRoPE.
	Method string
	// RopeDim is d_r: even; above HeadDim only with a Stride below 1.
	RopeDim int
	// Stride places the RoPE slots: slot i rotates at the frequency a
	// source RoPE gives index i·Stride (frequencies ordered fastest first;
	// a fractional index falls between two). 0 means HeadDim/RopeDim,
	// which spreads the slots over all source frequencies; 1 gives them
	// the RopeDim/2 fastest; 1/2 or 1/4 gives each of the fastest two or
	// four (at most one per KV head). See SlotTheta for the rope_theta
	// that makes loaders compute these frequencies.
	Stride float64
	// FreqFold is the number of adjacent frequencies whose components are
	// rotated together (RoRoPE only): a multiple of Stride dividing
	// HeadDim/2; 0 means the smallest, max(1, Stride).
	FreqFold int
	// Rank is one of Rankings() (RoRoPE only); "" means RankKey.
	Rank string
	// Profile is each query head's attention share by query–key distance,
	// which NopeFix averages over; nil means no fixes (the lost rotation is
	// dropped).
	Profile Profile
}

// Profile holds, for each query head, the share of its attention that
// falls at each query–key distance Δ = 0, 1, …: Profile[h][Δ], summing to 1.
type Profile [][]float64

// UniformProfile is heads copies of the uniform share over distances
// 0..span: the stand-in for attention statistics without calibration data.
func UniformProfile(heads, span int) Profile {
	p := make(Profile, heads)
	for h := range p {
		p[h] = make([]float64, span+1)
		for i := range p[h] {
			p[h][i] = 1 / float64(span+1)
		}
	}
	return p
}

// mean is E[R(−δΔ)] over head h's distances.
func (p Profile) mean(h int, delta float64) Fix {
	var f Fix
	for dist, w := range p[h] {
		if w == 0 {
			continue
		}
		sn, cs := math.Sincos(delta * float64(dist))
		f.C += w * cs
		f.S += w * sn
	}
	return f
}

// stride is the effective Stride for head dim d.
func (o Options) stride(d int) float64 {
	if o.Stride == 0 && o.RopeDim > 0 {
		return float64(d / o.RopeDim)
	}
	return o.Stride
}

// fold is the FreqFold RoRoPE uses: the option, or by default one band
// per slot stride.
func (o Options) fold(d int) int {
	if o.FreqFold != 0 {
		return o.FreqFold
	}
	return max(1, int(o.stride(d)))
}

// Check reports whether Decouple can run o on heads of d dims with
// kvHeads KV heads: the slots fit (CheckSlots); for RoRoPE, FreqFold (or
// its default) is a whole number of strides that divides d/2, with no
// more slots per band than it has components; the partial methods keep
// whole strides and take neither FreqFold nor a ranking.
func (o Options) Check(d, kvHeads int) error {
	if err := CheckSlots(d, o.RopeDim, o.Stride); err != nil {
		return err
	}
	s := o.stride(d)
	method := o.Method
	if method == "" {
		method = MethodRoRoPE
	}
	switch method {
	case MethodRoRoPE:
		fold := o.fold(d)
		if r := float64(fold) / s; fold < 1 || r != math.Trunc(r) || (d/2)%fold != 0 {
			return fmt.Errorf("freqfold %d must be a multiple of the rope stride %v and divide head_dim/2 = %d", fold, s, d/2)
		} else if int(r) > fold*kvHeads {
			return fmt.Errorf("rope stride %v gives %d slots to each band of %d frequencies, more than its %d components (%d KV heads); use a stride of at least %v", s, int(r), fold, fold*kvHeads, kvHeads, 1/float64(kvHeads))
		}
		if o.Rank != "" && o.Rank != RankKey && o.Rank != RankScore {
			return fmt.Errorf("unknown rope ranking %q (known: %v)", o.Rank, Rankings())
		}
	case Method2Norm, MethodHigh, MethodUniform:
		switch {
		case o.FreqFold != 0:
			return fmt.Errorf("freqfold applies to %s only, not %s", MethodRoRoPE, method)
		case o.Rank != "" && o.Rank != RankKey:
			return fmt.Errorf("rope ranking %s applies to %s only, not %s", o.Rank, MethodRoRoPE, method)
		case s < 1 || s != math.Trunc(s):
			return fmt.Errorf("%s keeps one (head, frequency) pair per slot: its rope stride must be a whole number, not %v", method, s)
		}
	default:
		return fmt.Errorf("unknown rope method %q (known: %v)", method, Methods())
	}
	return nil
}

// CheckSlots reports whether RoPE slots of ropeDim dims at stride (0 = the
// default) fit a head of d dims: ropeDim even, dividing d for the default
// stride, and the last slot's source index, (ropeDim/2 − 1)·stride,
// within the d/2 frequencies.
func CheckSlots(d, ropeDim int, stride float64) error {
	if ropeDim <= 0 || ropeDim%2 != 0 {
		return fmt.Errorf("rope dim %d must be even and positive", ropeDim)
	}
	if stride == 0 && d%ropeDim != 0 {
		return fmt.Errorf("rope dim %d must divide head_dim %d for the default stride (or give a stride)", ropeDim, d)
	}
	s := Options{RopeDim: ropeDim, Stride: stride}.stride(d)
	if !(s > 0) {
		return fmt.Errorf("rope stride %v must be positive", stride)
	}
	if last := float64(ropeDim/2-1) * s; last > float64(d/2-1) {
		return fmt.Errorf("rope dim %d at stride %v reaches source frequency %v; head_dim %d has %d", ropeDim, s, last, d, d/2)
	}
	return nil
}

// SlotTheta is the rope_theta under which a ropeDim-dim RoPE rotates pair
// i as a d-dim RoPE of base theta rotates pair i·stride (0 = d/ropeDim):
// θ^(stride·ropeDim/d). Any rope_scaling that maps each frequency on its
// own (linear, llama3) then maps the slots as it maps the source's.
func SlotTheta(theta float64, d, ropeDim int, stride float64) float64 {
	s := Options{RopeDim: ropeDim, Stride: stride}.stride(d)
	if s*float64(ropeDim) == float64(d) {
		return theta // exactly the source's, without a rounding pow
	}
	return math.Pow(theta, s*float64(ropeDim)/float64(d))
}

// Decouple chooses the RoPE rows of a layer whose heads rotate with source
// (Dim = HeadDim) and which has kvHeads KV heads.
func Decouple(source Params, kvHeads int, opts Options, m Moments) (*Decoupling, error) {
	d := source.Dim
	dr := opts.RopeDim
	if err := opts.Check(d, kvHeads); err != nil {
		return nil, err
	}
	keyDim := kvHeads * d
	if len(m.Key) != keyDim*keyDim || len(m.Query) != kvHeads*d*d {
		return nil, fmt.Errorf("rope: moments of size %d and %d, want %d and %d", len(m.Key), len(m.Query), keyDim*keyDim, kvHeads*d*d)
	}
	if heads := len(opts.Profile); opts.Profile != nil && (heads == 0 || heads%kvHeads != 0) {
		return nil, fmt.Errorf("rope: a profile of %d query heads for %d KV heads", heads, kvHeads)
	}
	srcFreq, _, err := source.InvFreq()
	if err != nil {
		return nil, err
	}
	s := opts.stride(d)
	target := source
	target.Dim, target.Theta = dr, SlotTheta(source.Theta, d, dr, opts.Stride)
	slotFreq, _, err := target.InvFreq()
	if err != nil {
		return nil, err
	}
	b := &builder{d: d, kvHeads: kvHeads, srcFreq: srcFreq, slotFreq: slotFreq, stride: s, profile: opts.Profile, moments: m}
	method := opts.Method
	if method == "" {
		method = MethodRoRoPE
	}
	switch method {
	case MethodRoRoPE:
		if err := b.rorope(opts.fold(d), opts.Rank == RankScore); err != nil {
			return nil, err
		}
	case Method2Norm, MethodHigh, MethodUniform:
		if err := b.partial(method); err != nil {
			return nil, err
		}
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
	b := &builder{d: d, kvHeads: kvHeads}
	for g := range kvHeads {
		for j := range d / 2 {
			b.addRope(b.unitPair(g, j), inv[j])
		}
	}
	return b.finish(), nil
}

// component is a direction over (KV head, frequency) pairs; the same
// coefficients act on the real halves (dim j) and imaginary halves
// (dim j+d/2) of every head. Keys are read with key, queries with query
// (equal for an orthogonal basis). Its terms are kept in a fixed order (a
// slice, not a map) so that sums over them, and so the output, are
// reproducible to the bit. An empty component is an unused RoPE slot.
type component []term

// term is one coefficient of a component: pair (g, j) is KV head g,
// frequency j.
type term struct {
	pair       [2]int
	key, query float64
}

type builder struct {
	d, kvHeads int
	stride     float64
	srcFreq    []float64
	slotFreq   []float64
	profile    Profile
	moments    Moments
	rope, nope []component
	freqs      []float64
}

func (b *builder) unitPair(g, j int) component { return component{{[2]int{g, j}, 1, 1}} }

func (b *builder) addRope(c component, freq float64) {
	b.rope = append(b.rope, c)
	b.freqs = append(b.freqs, freq)
}

// pairMoment is the moment of components over (head, frequency) pairs:
// the real and imaginary halves summed, which a common rotation leaves
// unchanged. at(g, i, h, j) is the moment's entry between dim i of KV
// head g and dim j of KV head h.
func (b *builder) pairMoment(pairs [][2]int, at func(g, i, h, j int) float64) *mat.SymDense {
	n := len(pairs)
	out := mat.NewSymDense(n, nil)
	half := b.d / 2
	for a, pa := range pairs {
		for c := a; c < n; c++ {
			pc := pairs[c]
			v := at(pa[0], pa[1], pc[0], pc[1]) + at(pa[0], pa[1]+half, pc[0], pc[1]+half)
			out.SetSym(a, c, v)
		}
	}
	return out
}

func (b *builder) keyAt(g, i, h, j int) float64 {
	d := b.d
	return b.moments.Key[(g*d+i)*b.kvHeads*d+h*d+j]
}

// groupQueryAt reads the summed query moment of KV head g's query heads;
// each query head reads only its own KV head's keys.
func (b *builder) groupQueryAt(g, i, h, j int) float64 {
	if g != h {
		return 0
	}
	d := b.d
	return b.moments.Query[g*d*d+i*d+j]
}

// rorope runs the per-band PCA: bands of fold frequencies, each keeping
// its strongest components on the RoPE slots of its frequencies. With
// whiten, the
// band's keys are seen through its queries: the PCA is of Lᵀ K L, L the
// Cholesky factor of the query moment, and the key and query coefficients
// of a component v are L v and L⁻ᵀ v (dual, so scores are unchanged).
func (b *builder) rorope(fold int, whiten bool) error {
	d := b.d
	for start := 0; start < d/2; start += fold {
		var pairs [][2]int
		for g := range b.kvHeads {
			for j := start; j < start+fold; j++ {
				pairs = append(pairs, [2]int{g, j})
			}
		}
		n := len(pairs)
		mk := b.pairMoment(pairs, b.keyAt)
		pca := mk
		var chol *mat.TriDense
		if whiten {
			mq := b.pairMoment(pairs, b.groupQueryAt)
			var err error
			if chol, err = choleskyRidge(mq); err != nil {
				return fmt.Errorf("rope: query moment of frequencies %d..%d: %w", start, start+fold-1, err)
			}
			var t, u mat.Dense
			t.Mul(chol.T(), mk)
			u.Mul(&t, chol)
			pca = symmetrise(&u)
		}
		var eig mat.EigenSym
		if !eig.Factorize(pca, true) {
			return fmt.Errorf("rope: eigendecomposition failed for frequencies %d..%d", start, start+fold-1)
		}
		var vecs mat.Dense
		eig.VectorsTo(&vecs)
		keyCoef, queryCoef := &vecs, &vecs
		if chol != nil {
			// Keys k̂ = Lᵀk are read by v: kᵀ(L v). Queries q̂ = L⁻¹q: qᵀ(L⁻ᵀ v).
			var kc, qc mat.Dense
			kc.Mul(chol, &vecs)
			if err := qc.Solve(chol.T(), &vecs); err != nil {
				return fmt.Errorf("rope: query basis of frequencies %d..%d: %w", start, start+fold-1, err)
			}
			keyCoef, queryCoef = &kc, &qc
		}
		lo, hi := b.slotsIn(start, start+fold)
		keep := hi - lo
		// EigenSym sorts ascending: the strongest components come last.
		var kept []component
		for k := n - 1; k >= 0; k-- {
			var comp component
			for i, p := range pairs {
				if kv, qv := keyCoef.At(i, k), queryCoef.At(i, k); kv != 0 || qv != 0 {
					comp = append(comp, term{p, kv, qv})
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
		for i, comp := range kept {
			b.addRope(comp, b.slotFreq[lo+i])
		}
	}
	return nil
}

// slotsIn is the range of RoPE slots whose source frequencies fall in
// [start, end).
func (b *builder) slotsIn(start, end int) (lo, hi int) {
	idx := func(j int) int { return int(math.Ceil(float64(j)/b.stride - 1e-9)) }
	return min(idx(start), len(b.slotFreq)), min(idx(end), len(b.slotFreq))
}

// choleskyRidge factors a, adding a ridge of 1e-9 of its mean diagonal
// (and more, up to 1e-3, while that fails): a band's queries can be
// degenerate, and a tiny ridge changes no ranking.
func choleskyRidge(a *mat.SymDense) (*mat.TriDense, error) {
	n := a.SymmetricDim()
	var tr float64
	for i := range n {
		tr += a.At(i, i)
	}
	if !(tr > 0) {
		return nil, fmt.Errorf("no query energy")
	}
	for ridge := 1e-9; ridge <= 1e-3; ridge *= 10 {
		r := mat.NewSymDense(n, nil)
		r.CopySym(a)
		for i := range n {
			r.SetSym(i, i, r.At(i, i)+ridge*tr/float64(n))
		}
		var c mat.Cholesky
		if c.Factorize(r) {
			var l mat.TriDense
			c.LTo(&l)
			return &l, nil
		}
	}
	return nil, fmt.Errorf("not positive definite")
}

func symmetrise(a *mat.Dense) *mat.SymDense {
	n, _ := a.Dims()
	s := mat.NewSymDense(n, nil)
	for i := range n {
		for j := i; j < n; j++ {
			s.SetSym(i, j, (a.At(i, j)+a.At(j, i))/2)
		}
	}
	return s
}

// weight is the share of a component's score that term t carries: the
// product of its key and query coefficients.
func weight(t term) float64 { return math.Abs(t.key * t.query) }

func meanFreqIndex(c component) float64 {
	var s, w float64
	for _, t := range c {
		s += weight(t) * float64(t.pair[1])
		w += weight(t)
	}
	return s / w
}

// partial keeps one (head, frequency) pair per slot, from the band of
// stride frequencies the slot stands for; every other pair loses its
// rotation.
func (b *builder) partial(method string) error {
	d, keyDim, h := b.d, b.kvHeads*b.d, b.d/2
	m := b.moments
	norm := func(g, j int) float64 {
		i := g*d + j
		k := m.Key[i*keyDim+i] + m.Key[(i+h)*keyDim+i+h]
		q := m.Query[g*d*d+j*d+j] + m.Query[g*d*d+(j+h)*d+j+h]
		return math.Sqrt(math.Max(k, 0) * math.Max(q, 0))
	}
	c := int(b.stride)
	kept := map[[2]int]bool{}
	for slot := range b.slotFreq {
		best, bestScore := [2]int{-1, -1}, math.Inf(-1)
		for g := range b.kvHeads {
			for j := slot * c; j < min((slot+1)*c, d/2); j++ {
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
// ones; and computes the Fixes when there is a profile.
func (b *builder) finish() *Decoupling {
	d, keyDim, h := b.d, b.kvHeads*b.d, b.d/2
	row := func(c component, imag, query bool) []float64 {
		r := make([]float64, keyDim)
		off := 0
		if imag {
			off = h
		}
		for _, t := range c {
			v := t.key
			if query {
				v = t.query
			}
			r[t.pair[0]*d+t.pair[1]+off] = v
		}
		return r
	}
	out := &Decoupling{KeyDim: keyDim, InvFreq: slices.Clone(b.freqs)}
	orthogonal := true
	for _, cs := range [][]component{b.rope, b.nope} {
		for _, c := range cs {
			for _, t := range c {
				orthogonal = orthogonal && t.key == t.query
			}
		}
	}
	for _, c := range b.rope {
		out.Rope = append(out.Rope, row(c, false, false)...)
		out.Rope = append(out.Rope, row(c, true, false)...)
		if !orthogonal {
			out.QueryRope = append(out.QueryRope, row(c, false, true)...)
			out.QueryRope = append(out.QueryRope, row(c, true, true)...)
		}
	}
	for _, imag := range []bool{false, true} {
		for _, c := range b.nope {
			out.Nope = append(out.Nope, row(c, imag, false)...)
			if !orthogonal {
				out.QueryNope = append(out.QueryNope, row(c, imag, true)...)
			}
		}
	}
	if orthogonal {
		out.QueryRope, out.QueryNope = out.Rope, out.Nope
	}
	if b.profile != nil {
		free := b.freeFixes()
		out.NopeFix = make([][]Fix, len(b.profile))
		for h := range out.NopeFix {
			for _, c := range b.nope {
				out.NopeFix[h] = append(out.NopeFix[h], b.nopeFix(c, h, free))
			}
		}
	}
	return out
}
