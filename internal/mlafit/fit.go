package mlafit

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"time"
)

// Data are the sequences a layer is fitted on: Seqs sequences of Len rows,
// each row an attention input (X, Hidden values) and the output the layer
// should give for it (Y, Hidden values).
type Data[T Float] struct {
	X, Y      []T
	Seqs, Len int
}

// FitOptions control Fit.
type FitOptions struct {
	// Steps is the most optimizer steps; Batch the sequences per step.
	Steps, Batch int
	// LR is Adam's peak step relative to the RMS of each weight row: a row
	// of RMS r moves by about LR·r per step (a bias entry by its weight
	// row's, the norm by its own RMS), so one rate suits tensors, rows and
	// models of any scale — the stock format's latent rows of
	// kv_a_proj_with_mqa are far smaller than its RoPE rows. It warms up
	// linearly over the first 5% of the steps and decays on a cosine to
	// zero.
	LR float64
	// Train selects the tensors to fit; the others are held.
	Train [NumTensors]bool
	// Val is how many of the data's last sequences are held back: the fit
	// keeps the parameters that score best on them, evaluated every
	// EvalEvery steps and at the end, and stops after Patience
	// evaluations without improvement (0: never early).
	Val, EvalEvery, Patience int
	// Values first refits W_UV in closed form (least squares with the
	// attention probabilities held), kept only if the held-back sequences
	// score better with it.
	Values bool
	// Seed fixes the order the sequences are drawn in.
	Seed uint64
	// Threads is how many sequences are computed at once (their products
	// should then be single-threaded).
	Threads int
}

// MaxValueFeatures bounds heads·latent for the closed-form W_UV refit,
// whose statistics are a square matrix of that side per worker (32 MiB
// in float64 at the bound) and cost that square per token.
const MaxValueFeatures = 2048

// Report is what a fit did. Losses are squared errors relative to the
// targets' mean energy per row.
type Report struct {
	// TrainBefore and ValBefore score the starting parameters, ValAfter
	// the kept ones, TrainAfter the last steps' batches.
	TrainBefore float64 `json:"train_loss_before"`
	TrainAfter  float64 `json:"train_loss_after"`
	ValBefore   float64 `json:"val_loss_before"`
	ValAfter    float64 `json:"val_loss_after"`
	// ValValues scores the closed-form W_UV refit, when one was tried;
	// ValuesSkipped says why it was not.
	ValValues     float64 `json:"val_loss_values,omitempty"`
	ValuesSkipped string  `json:"values_skipped,omitempty"`
	// Steps were taken; BestStep is the step whose parameters were kept
	// (0: the starting ones).
	Steps    int     `json:"steps"`
	BestStep int     `json:"best_step"`
	Seconds  float64 `json:"seconds"`
}

// Progress is told of each step: the step done, of steps, and the loss of
// its batch.
type Progress func(step, steps int, loss float64)

// Fit trains p's selected tensors in place so that l's output on d.X
// matches d.Y, and leaves p at the parameters that scored best on the
// held-back sequences (the starting ones if none beat them). It is
// deterministic for a given Seed and Threads.
func Fit[T Float](ctx context.Context, l *Layer[T], p *Params[T], d Data[T], o FitOptions, progress Progress) (Report, error) {
	start := time.Now()
	var rep Report
	if err := check(l.s, p); err != nil {
		return rep, err
	}
	D := l.s.Hidden
	switch {
	case d.Seqs <= 0 || d.Len <= 0 || len(d.X) != d.Seqs*d.Len*D || len(d.Y) != len(d.X):
		return rep, fmt.Errorf("mlafit: %d inputs and %d targets for %d sequences of %d×%d", len(d.X), len(d.Y), d.Seqs, d.Len, D)
	case d.Len > l.MaxLen():
		return rep, fmt.Errorf("mlafit: sequences of %d rows, the layer was made for %d", d.Len, l.MaxLen())
	case o.Val < 1 || o.Val >= d.Seqs:
		return rep, fmt.Errorf("mlafit: %d held-back sequences of %d: want at least one of each", o.Val, d.Seqs)
	case o.Steps < 0 || o.Batch < 1 || !(o.LR > 0):
		return rep, fmt.Errorf("mlafit: steps %d, batch %d, learning rate %v", o.Steps, o.Batch, o.LR)
	}
	f := newFitter(l, p, d, o)
	train := d.Seqs - o.Val
	val := make([]int, o.Val)
	for i := range val {
		val[i] = train + i
	}
	all := make([]int, train)
	for i := range all {
		all[i] = i
	}
	var err error
	if rep.ValBefore, err = f.loss(ctx, val, false); err != nil {
		return rep, err
	}
	if rep.TrainBefore, err = f.loss(ctx, all, false); err != nil {
		return rep, err
	}
	rep.ValAfter = rep.ValBefore
	best := p.Clone()
	if hz := l.s.Heads * l.s.Latent; o.Values && hz > MaxValueFeatures {
		rep.ValuesSkipped = fmt.Sprintf("heads·latent = %d exceeds %d: its normal equations grow with the square", hz, MaxValueFeatures)
	} else if o.Values {
		if err := f.fitValues(ctx, all); err != nil {
			return rep, err
		}
		if rep.ValValues, err = f.loss(ctx, val, false); err != nil {
			return rep, err
		}
		if rep.ValValues < rep.ValAfter {
			rep.ValAfter = rep.ValValues
			best = p.Clone()
		} else {
			for i, t := range best {
				copy(p[i], t)
			}
		}
	}
	rng := rand.New(rand.NewPCG(o.Seed, 0x6d6c6166))
	order := rng.Perm(train)
	next := 0
	batch := make([]int, min(o.Batch, train))
	var recent []float64
	stale := 0
	for step := 1; step <= o.Steps; step++ {
		for i := range batch {
			if next == len(order) {
				order, next = rng.Perm(train), 0
			}
			batch[i] = order[next]
			next++
		}
		loss, err := f.loss(ctx, batch, true)
		if err != nil {
			return rep, err
		}
		f.adam(step)
		rep.Steps = step
		if recent = append(recent, loss); len(recent) > 8 {
			recent = recent[1:]
		}
		if progress != nil {
			progress(step, o.Steps, loss)
		}
		if (o.EvalEvery > 0 && step%o.EvalEvery == 0) || step == o.Steps {
			v, err := f.loss(ctx, val, false)
			if err != nil {
				return rep, err
			}
			if v < rep.ValAfter {
				rep.ValAfter, rep.BestStep, stale = v, step, 0
				for i, t := range p {
					copy(best[i], t)
				}
			} else if stale++; o.Patience > 0 && stale >= o.Patience {
				break
			}
		}
	}
	var sum float64
	for _, v := range recent {
		sum += v
	}
	rep.TrainAfter = rep.TrainBefore
	if len(recent) > 0 {
		rep.TrainAfter = sum / float64(len(recent))
	}
	for i, t := range best {
		copy(p[i], t)
	}
	rep.Seconds = time.Since(start).Seconds()
	return rep, nil
}

// fitter holds a fit's state: per-worker scratch and gradients, and Adam's
// moments of the trained tensors.
type fitter[T Float] struct {
	l    *Layer[T]
	p    *Params[T]
	d    Data[T]
	o    FitOptions
	norm float64 // the targets' mean energy per row
	// lr is each trained tensor's peak step per row (one entry per
	// output row of a weight and its bias, one for the norm).
	lr    [NumTensors][]float64
	m, v  Params[T]
	grad  Params[T]
	works []*Work[T]
	grads []*Params[T]
	dy    [][]T
}

func newFitter[T Float](l *Layer[T], p *Params[T], d Data[T], o FitOptions) *fitter[T] {
	f := &fitter[T]{l: l, p: p, d: d, o: o}
	threads := max(1, o.Threads)
	D := l.s.Hidden
	rows := d.Seqs * d.Len
	var energy float64
	for r := range rows {
		var e float64
		for _, v := range d.Y[r*D : (r+1)*D] {
			e += float64(v) * float64(v)
		}
		energy += e
	}
	f.norm = max(energy/float64(rows), math.SmallestNonzeroFloat64)
	weightOf := [NumTensors]int{Q: Q, QBias: Q, KVA: KVA, KVABias: KVA, KVANorm: KVANorm, KVB: KVB, KVBBias: KVB, O: O, OBias: O}
	outRows := l.s.rows()
	for i, t := range p {
		if t == nil || !o.Train[i] {
			continue
		}
		w := p[weightOf[i]]
		n := outRows[weightOf[i]]
		cols := len(w) / n
		f.lr[i] = make([]float64, n)
		for r := range n {
			f.lr[i][r] = o.LR * rms(w[r*cols:(r+1)*cols])
		}
		f.m[i], f.v[i], f.grad[i] = make([]T, len(t)), make([]T, len(t)), make([]T, len(t))
	}
	for range threads {
		f.works = append(f.works, &Work[T]{})
		var g Params[T]
		for i := range f.grad {
			if f.grad[i] != nil {
				g[i] = make([]T, len(f.grad[i]))
			}
		}
		f.grads = append(f.grads, &g)
		f.dy = append(f.dy, make([]T, d.Len*D))
	}
	return f
}

func rms[T Float](x []T) float64 {
	var s float64
	for _, v := range x {
		s += float64(v) * float64(v)
	}
	if len(x) == 0 || s == 0 {
		return 1e-3
	}
	return math.Sqrt(s / float64(len(x)))
}

// loss is the mean relative loss over the sequences seqs; with grad it
// also leaves their mean gradient in f.grad.
func (f *fitter[T]) loss(ctx context.Context, seqs []int, grad bool) (float64, error) {
	l, d := f.l, f.d
	D, n := l.s.Hidden, d.Len
	threads := len(f.works)
	losses := make([]float64, len(seqs))
	if grad {
		for _, g := range f.grads {
			for _, t := range g {
				clear(t)
			}
		}
	}
	var wg sync.WaitGroup
	workers := min(threads, len(seqs))
	for wk := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w, g, dy := f.works[wk], f.grads[wk], f.dy[wk]
			// A fixed share of the sequences per worker keeps every
			// gradient sum in one order: the fit is deterministic.
			for k := wk; k < len(seqs); k += workers {
				if ctx.Err() != nil {
					return
				}
				si := seqs[k]
				x, t := d.X[si*n*D:(si+1)*n*D], d.Y[si*n*D:(si+1)*n*D]
				y := l.Forward(f.p, x, n, w)
				var sum float64
				for j, v := range y {
					diff := v - t[j]
					sum += float64(diff) * float64(diff)
					dy[j] = 2 * diff
				}
				// Each sequence's rows count once in the batch mean.
				losses[k] = sum / (float64(n) * f.norm)
				if grad {
					c := T(1 / (float64(n) * f.norm * float64(len(seqs))))
					for j := range dy {
						dy[j] *= c
					}
					l.Backward(f.p, x, w, dy, g)
				}
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	var total float64
	for _, v := range losses {
		total += v
	}
	if grad {
		// Summed in worker order: deterministic for a given Threads.
		for i, t := range f.grad {
			if t == nil {
				continue
			}
			clear(t)
			for _, g := range f.grads {
				for j, v := range g[i] {
					t[j] += v
				}
			}
		}
	}
	loss := total / float64(len(seqs))
	if math.IsNaN(loss) || math.IsInf(loss, 0) {
		return 0, fmt.Errorf("mlafit: loss is %v", loss)
	}
	return loss, nil
}

// adam takes optimizer step (1-based) with the gradient in f.grad.
func (f *fitter[T]) adam(step int) {
	const b1, b2, eps = 0.9, 0.999, 1e-12
	steps := max(1, f.o.Steps)
	warm := max(1, steps/20)
	sched := 0.5 * (1 + math.Cos(math.Pi*float64(step-1)/float64(steps)))
	if step <= warm {
		sched = float64(step) / float64(warm)
	}
	c1 := 1 - math.Pow(b1, float64(step))
	c2 := 1 - math.Pow(b2, float64(step))
	for i, g := range f.grad {
		if g == nil {
			continue
		}
		m, v, p := f.m[i], f.v[i], f.p[i]
		// A weight's entries are row-major: the row is j / cols; a bias
		// entry is its own row; the norm has one rate.
		rows := f.lr[i]
		cols := len(g) / len(rows)
		for j, gj := range g {
			lr := rows[j/cols] * sched / c1
			m[j] = b1*m[j] + (1-b1)*gj
			v[j] = b2*v[j] + (1-b2)*gj*gj
			p[j] -= T(lr * float64(m[j]) / (math.Sqrt(float64(v[j])/c2) + eps))
		}
	}
}
