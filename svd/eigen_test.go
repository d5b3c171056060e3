package svd

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"gonum.org/v1/gonum/mat"
)

// symWithSpectrum returns Q·diag(vals)·Qᵀ for a random orthogonal Q.
func symWithSpectrum(rng *rand.Rand, vals []float64) []float64 {
	n := len(vals)
	g := mat.NewDense(n, n, nil)
	for i := range n {
		for j := range n {
			g.Set(i, j, rng.NormFloat64())
		}
	}
	var qr mat.QR
	qr.Factorize(g)
	var q mat.Dense
	qr.QTo(&q)
	var qd, a mat.Dense
	qd.Mul(&q, mat.NewDiagDense(n, vals))
	a.Mul(&qd, q.T())
	out := a.RawMatrix().Data
	for i := range n {
		for j := range i {
			s := (out[i*n+j] + out[j*n+i]) / 2
			out[i*n+j], out[j*n+i] = s, s
		}
	}
	return out
}

// Every spectrum shape the latent meets: distinct, decaying like trained
// weights, tightly clustered, exactly repeated, rank-deficient and
// indefinite. The top-k eigenpairs must match gonum's full
// eigendecomposition: eigenvalues to 1e-12·‖A‖, residuals and
// orthogonality to 1e-10, and, where the k-th eigenvalue is separated from
// the next, the same invariant subspace (largest principal angle's sine
// below 1e-8).
func TestSymEigTopMatchesGonum(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	spectra := map[string]func(n int) []float64{
		"distinct": func(n int) []float64 {
			v := make([]float64, n)
			for i := range v {
				v[i] = float64(i+1) + rng.Float64()
			}
			return v
		},
		"power-law": func(n int) []float64 {
			v := make([]float64, n)
			for i := range v {
				v[i] = math.Pow(1+float64(i), -1.5)
			}
			return v
		},
		"clustered": func(n int) []float64 {
			v := make([]float64, n)
			for i := range v {
				v[i] = 1 + 1e-9*float64(i%7) + float64(i/7)
			}
			return v
		},
		"repeated": func(n int) []float64 {
			v := make([]float64, n)
			for i := range v {
				v[i] = float64(i % 3)
			}
			return v
		},
		"rank-deficient": func(n int) []float64 {
			v := make([]float64, n)
			for i := range n / 3 {
				v[i] = 1 + rng.Float64()
			}
			return v
		},
		"indefinite": func(n int) []float64 {
			v := make([]float64, n)
			for i := range v {
				v[i] = rng.NormFloat64()
			}
			return v
		},
	}
	for _, name := range []string{"distinct", "power-law", "clustered", "repeated", "rank-deficient", "indefinite"} {
		for _, n := range []int{1, 2, 3, 17, 64, 65, 150, 300} {
			for _, k := range []int{1, n / 3, n} {
				if k == 0 {
					continue
				}
				t.Run(fmt.Sprintf("%s/n%d/k%d", name, n, k), func(t *testing.T) {
					checkEigTop(t, symWithSpectrum(rng, spectra[name](n)), n, k)
				})
			}
		}
	}
}

func checkEigTop(t *testing.T, a []float64, n, k int) {
	t.Helper()
	var ref mat.EigenSym
	if !ref.Factorize(mat.NewSymDense(n, slices.Clone(a)), true) {
		t.Fatal("gonum eigendecomposition failed")
	}
	want := ref.Values(nil)
	slices.Reverse(want)
	var refVecs mat.Dense
	ref.VectorsTo(&refVecs)
	norm := math.Max(math.Abs(want[0]), math.Abs(want[n-1]))
	upper := slices.Clone(a)
	for i := range n {
		for j := range i {
			upper[i*n+j] = math.NaN() // only the upper triangle is read
		}
	}
	vals, vecs, total, err := symEigTop(upper, n, k)
	if err != nil {
		t.Fatal(err)
	}
	var wantTotal float64
	for _, v := range want {
		wantTotal += math.Max(v, 0)
	}
	if math.Abs(total-wantTotal) > 1e-12*float64(n)*norm {
		t.Errorf("total %v, want %v", total, wantTotal)
	}
	for i := range k {
		if math.Abs(vals[i]-want[i]) > 1e-12*float64(n)*norm {
			t.Errorf("eigenvalue %d: %v, want %v", i, vals[i], want[i])
		}
	}
	am, z := mat.NewDense(n, n, a), mat.NewDense(n, k, vecs)
	var az, ztz mat.Dense
	az.Mul(am, z)
	for j := range k {
		for i := range n {
			az.Set(i, j, az.At(i, j)-vals[j]*z.At(i, j))
		}
	}
	if r := mat.Norm(&az, 2); r > 1e-10*norm*math.Sqrt(float64(k)) {
		t.Errorf("residual ‖AZ − ZΛ‖ = %.3g", r)
	}
	ztz.Mul(z.T(), z)
	for i := range k {
		ztz.Set(i, i, ztz.At(i, i)-1)
	}
	if o := mat.Norm(&ztz, 2); o > 1e-10*float64(k) {
		t.Errorf("orthogonality ‖ZᵀZ − I‖ = %.3g", o)
	}
	if k < n && want[k-1]-want[k] > 1e-6*norm {
		// sin of the largest principal angle: ‖(I − Z_ref Z_refᵀ) Z‖₂.
		zr := refVecs.Slice(0, n, n-k, n)
		var p, res mat.Dense
		p.Mul(zr.T(), z)
		res.Mul(zr, &p)
		res.Sub(z, &res)
		var sv mat.SVD
		sv.Factorize(&res, mat.SVDNone)
		if s := sv.Values(nil)[0]; s > 1e-8 {
			t.Errorf("subspace angle sine %.3g against gonum's", s)
		}
	}
}

// BenchmarkSymEigTop is the latent's eigenproblem at Llama-3-8B's size
// (rows 1984 = 960 position-free key dims + 1024 value dims, rank 512)
// against gonum's full decomposition.
func BenchmarkSymEigTop(b *testing.B) {
	const n, k = 1984, 512
	rng := rand.New(rand.NewPCG(13, 14))
	v := make([]float64, n)
	for i := range v {
		v[i] = math.Pow(1+float64(i), -1)
	}
	a := symWithSpectrum(rng, v)
	b.Run("top512", func(b *testing.B) {
		for b.Loop() {
			if _, _, _, err := symEigTop(slices.Clone(a), n, k); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("gonum-full", func(b *testing.B) {
		for b.Loop() {
			var e mat.EigenSym
			if !e.Factorize(mat.NewSymDense(n, slices.Clone(a)), true) {
				b.Fatal("failed")
			}
		}
	})
}
