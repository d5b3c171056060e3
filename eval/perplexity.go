package eval

import (
	"context"
	"fmt"
	"math"
	"time"
)

// PerplexityOptions sets the windowing protocol.
type PerplexityOptions struct {
	// Ctx is the window length in tokens.
	Ctx int
	// MaxWindows limits the number of windows (0 = all).
	MaxWindows int
	// Progress, when not nil, is called after each window with the count done and the total.
	Progress func(done, total int)
}

// PerplexityResult is the outcome of a perplexity run.
type PerplexityResult struct {
	PPL           float64 `json:"ppl"`
	MeanNLL       float64 `json:"mean_nll"`
	TokensScored  int     `json:"tokens_scored"`
	Windows       int     `json:"windows"`
	Ctx           int     `json:"ctx"`
	TokensInFile  int     `json:"tokens_in_file"`
	TokensForward int     `json:"tokens_forward"`
	Seconds       float64 `json:"seconds"`
	// TokensPerSecond counts every token run through the model (windows × ctx).
	TokensPerSecond float64 `json:"tokens_per_second"`
	// KVCacheBytesAllocated is the memory the run's cache pages held.
	KVCacheBytesAllocated int64 `json:"kv_cache_bytes_allocated"`
}

// Perplexity scores ids with the protocol of the reference figures: cut into
// non-overlapping windows of opt.Ctx tokens (dropping the partial tail), run
// each window from an empty cache and score positions 1..Ctx-1 of every
// window; ppl = exp(mean NLL). NLL is accumulated in float64.
func Perplexity(ctx context.Context, r *Runner, ids []int, opt PerplexityOptions) (PerplexityResult, error) {
	res := PerplexityResult{Ctx: opt.Ctx, TokensInFile: len(ids)}
	if opt.Ctx < 2 {
		return res, fmt.Errorf("perplexity: ctx %d must be at least 2", opt.Ctx)
	}
	if opt.Ctx > r.MaxPositions() {
		return res, fmt.Errorf("perplexity: ctx %d exceeds the runner's %d positions", opt.Ctx, r.MaxPositions())
	}
	windows := len(ids) / opt.Ctx
	if opt.MaxWindows > 0 {
		windows = min(windows, opt.MaxWindows)
	}
	if windows == 0 {
		return res, fmt.Errorf("perplexity: %d tokens do not fill one window of %d", len(ids), opt.Ctx)
	}
	vocab := r.model.Config.VocabSize
	cache := r.NewCache()
	start := time.Now()
	var nll float64
	for w := range windows {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		win := ids[w*opt.Ctx : (w+1)*opt.Ctx]
		cache.Reset()
		logits, err := r.Forward(ctx, cache, win, true)
		if err != nil {
			return res, fmt.Errorf("window %d: %w", w, err)
		}
		for i := 1; i < opt.Ctx; i++ {
			nll += NegLogLikelihood(logits[(i-1)*vocab:i*vocab], win[i])
		}
		if opt.Progress != nil {
			opt.Progress(w+1, windows)
		}
	}
	res.Seconds = time.Since(start).Seconds()
	res.KVCacheBytesAllocated = cache.BytesAllocated()
	res.Windows = windows
	res.TokensScored = windows * (opt.Ctx - 1)
	res.TokensForward = windows * opt.Ctx
	res.MeanNLL = nll / float64(res.TokensScored)
	res.PPL = math.Exp(res.MeanNLL)
	if res.Seconds > 0 {
		res.TokensPerSecond = float64(res.TokensForward) / res.Seconds
	}
	return res, nil
}

// NegLogLikelihood is −log softmax(logits)[target], computed in float64.
func NegLogLikelihood(logits []float32, target int) float64 {
	m := math.Inf(-1)
	for _, v := range logits {
		m = math.Max(m, float64(v))
	}
	var sum float64
	for _, v := range logits {
		sum += math.Exp(float64(v) - m)
	}
	return m + math.Log(sum) - float64(logits[target])
}
