package rope

// freeFixes is, per head and source frequency j, the mean rotation
// E[R(−ω_jΔ)] over the head's attention distances: what a position-free
// component at ω_j keeps of its rotation on average.
func (b *builder) freeFixes() [][]Fix {
	out := make([][]Fix, len(b.profile))
	for h := range out {
		out[h] = make([]Fix, len(b.srcFreq))
		for j, w := range b.srcFreq {
			out[h][j] = b.profile.mean(h, w)
		}
	}
	return out
}

// headWeights is component c's score share per source frequency as head h
// reads it (the terms of h's KV head; all terms if those carry nothing),
// summing to 1; nil for a component without weight.
func (b *builder) headWeights(c component, h int) []float64 {
	g := h / (len(b.profile) / b.kvHeads)
	for _, own := range []bool{true, false} {
		w := make([]float64, len(b.srcFreq))
		var total float64
		for _, t := range c {
			if own && t.pair[0] != g {
				continue
			}
			w[t.pair[1]] += weight(t)
			total += weight(t)
		}
		if total > 0 {
			for j := range w {
				w[j] /= total
			}
			return w
		}
	}
	return nil
}

// nopeFix is head h's Fix for position-free component c: the Fixes of its
// frequencies, weighted by the share of c's score at each.
func (b *builder) nopeFix(c component, h int, free [][]Fix) Fix {
	w := b.headWeights(c, h)
	if w == nil {
		return Fix{C: 1}
	}
	var out Fix
	for j, v := range w {
		out.C += v * free[h][j].C
		out.S += v * free[h][j].S
	}
	return out
}
