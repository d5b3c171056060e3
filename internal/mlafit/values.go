package mlafit

import (
	"context"
	"sync"

	"github.com/transmla/transmla/internal/f64"
)

// fitValues refits the value half of kv_b_proj (W_UV) in closed form: with
// the attention probabilities and latents of the current parameters held,
// the output is linear in W_UV,
//
//	y_r = Σ_h O_h·W_UV,h·z_h,r + const,   z_h,r = Σ_j P_h[r,j]·c_j,
//
// so the least-squares W_UV over the sequences seqs solves the normal
// equations Σ_h' (O_hᵀO_h')·W_UV,h'·(Σ_r z_h',r z_h,rᵀ) = Σ_r O_hᵀ y'_r z_h,rᵀ,
// which conjugate gradients solves from the current W_UV (the equations
// couple the heads through o_proj). The statistics are summed in float64.
func (f *fitter[T]) fitValues(ctx context.Context, seqs []int) error {
	l, d, p := f.l, f.d, f.p
	s := l.s
	D, H, nope, dv, dc := s.Hidden, s.Heads, s.Nope, s.Value, s.Latent
	kvw, n := nope+dv, d.Len
	hz, hv := H*dc, H*dv
	// c0 is what the output gets whatever W_UV is: o_proj's bias and the
	// value bias through o_proj (the probabilities of a row sum to one).
	c0 := make([]T, D)
	copy(c0, p[OBias])
	if b := p[KVBBias]; b != nil {
		for o := range D {
			var sum T
			for h := range H {
				for j := range dv {
					sum += p[O][o*hv+h*dv+j] * b[h*kvw+nope+j]
				}
			}
			c0[o] += sum
		}
	}
	type acc struct {
		zz, uz []float64 // Σ zcatᵀzcat (hz×hz); per head Σ U_hᵀZ_h (dv×dc)
		z, u   []T       // one sequence's zcat (n×hz) and U (n×hv)
		y      []T
		zzT    []T
		uzT    []T
	}
	workers := min(len(f.works), len(seqs))
	accs := make([]*acc, workers)
	var wg sync.WaitGroup
	for wk := range workers {
		a := &acc{zz: make([]float64, hz*hz), uz: make([]float64, H*dv*dc), z: make([]T, n*hz), u: make([]T, n*hv),
			y: make([]T, n*D), zzT: make([]T, hz*hz), uzT: make([]T, dv*dc)}
		accs[wk] = a
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := f.works[wk]
			for k := wk; k < len(seqs); k += workers {
				if ctx.Err() != nil {
					return
				}
				si := seqs[k]
				x, t := d.X[si*n*D:(si+1)*n*D], d.Y[si*n*D:(si+1)*n*D]
				l.Forward(p, x, n, w)
				for h := range H {
					l.gemm(false, false, n, dc, n, 1, w.p[h*n*n:], n, w.cn, dc, 0, a.z[h*dc:], hz)
				}
				for r := range n {
					for o := range D {
						a.y[r*D+o] = t[r*D+o] - c0[o]
					}
				}
				l.gemm(false, false, n, hv, D, 1, a.y, D, p[O], hv, 0, a.u, hv)
				l.gemm(true, false, hz, hz, n, 1, a.z, hz, a.z, hz, 0, a.zzT, hz)
				for i, v := range a.zzT {
					a.zz[i] += float64(v)
				}
				for h := range H {
					l.gemm(true, false, dv, dc, n, 1, a.u[h*dv:], hv, a.z[h*dc:], hz, 0, a.uzT, dc)
					for i, v := range a.uzT {
						a.uz[h*dv*dc+i] += float64(v)
					}
				}
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	zz, rhs := accs[0].zz, accs[0].uz
	for _, a := range accs[1:] {
		for i, v := range a.zz {
			zz[i] += v
		}
		for i, v := range a.uz {
			rhs[i] += v
		}
	}
	// G = OᵀO, the heads' coupling through o_proj.
	g := make([]float64, hv*hv)
	for o := range D {
		row := p[O][o*hv : (o+1)*hv]
		for i, a := range row {
			if a == 0 {
				continue
			}
			gi := g[i*hv : (i+1)*hv]
			for j, b := range row {
				gi[j] += float64(a) * float64(b)
			}
		}
	}
	// A tiny ridge keeps directions the data never excites where they are.
	var trace float64
	for i := range hz {
		trace += zz[i*hz+i]
	}
	ridge := 1e-6 * trace / float64(hz)
	var gtrace float64
	for i := range hv {
		gtrace += g[i*hv+i]
	}
	gscale := gtrace / float64(hv)
	stack := make([]float64, hv*dc)
	apply := func(dst, x []float64) {
		// dst_h = Σ_h' G_hh'·X_h'·S_h'h + ridge·ḡ·X_h (X_h is dv×dc): the
		// products X_h'·S_h'h stacked over h', then one product with G's
		// rows of head h.
		for h := range H {
			for hp := range H {
				f64.Gemm(false, false, dv, dc, dc, 1, x[hp*dv*dc:], dc, zz[hp*dc*hz+h*dc:], hz, 0, stack[hp*dv*dc:], dc)
			}
			f64.Gemm(false, false, dv, dc, hv, 1, g[h*dv*hv:], hv, stack, dc, 0, dst[h*dv*dc:], dc)
		}
		for i, v := range x {
			dst[i] += ridge * gscale * v
		}
	}
	x := make([]float64, H*dv*dc)
	for h := range H {
		for i := range dv {
			for j := range dc {
				x[h*dv*dc+i*dc+j] = float64(p[KVB][(h*kvw+nope+i)*dc+j])
			}
		}
	}
	conjugateGradient(ctx, apply, rhs, x, 200, 1e-6)
	for h := range H {
		for i := range dv {
			for j := range dc {
				p[KVB][(h*kvw+nope+i)*dc+j] = T(x[h*dv*dc+i*dc+j])
			}
		}
	}
	return ctx.Err()
}

// conjugateGradient improves x towards the solution of A·x = b, A
// symmetric positive definite given by apply, for at most iters steps or
// until the residual falls to tol of b's norm.
func conjugateGradient(ctx context.Context, apply func(dst, x []float64), b, x []float64, iters int, tol float64) {
	n := len(b)
	r, q, dir := make([]float64, n), make([]float64, n), make([]float64, n)
	apply(q, x)
	var bb, rr float64
	for i := range r {
		r[i] = b[i] - q[i]
		dir[i] = r[i]
		rr += r[i] * r[i]
		bb += b[i] * b[i]
	}
	for range iters {
		if rr <= tol*tol*bb || ctx.Err() != nil {
			return
		}
		apply(q, dir)
		var dq float64
		for i := range q {
			dq += dir[i] * q[i]
		}
		if !(dq > 0) {
			return
		}
		alpha := rr / dq
		var next float64
		for i := range x {
			x[i] += alpha * dir[i]
			r[i] -= alpha * q[i]
			next += r[i] * r[i]
		}
		beta := next / rr
		rr = next
		for i := range dir {
			dir[i] = r[i] + beta*dir[i]
		}
	}
}
