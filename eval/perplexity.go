package eval

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/transmla/transmla/kernels"
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
	cache := r.NewCache()
	start := time.Now()
	var nll float64
	var logits []float32
	score := &nllTask{vocab: r.model.Config.VocabSize, nll: make([]float64, opt.Ctx-1)}
	for w := range windows {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		win := ids[w*opt.Ctx : (w+1)*opt.Ctx]
		cache.Reset()
		var err error
		if logits, err = r.ForwardInto(ctx, cache, win, true, logits); err != nil {
			return res, fmt.Errorf("window %d: %w", w, err)
		}
		// Positions are scored in parallel and summed in order, so the
		// total is what one loop over them gives.
		score.logits, score.targets = logits, win[1:]
		kernels.Parallel(0, (len(score.nll)+nllRows-1)/nllRows, score)
		for _, v := range score.nll {
			nll += v
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
	m := kernels.MaxOf(logits)
	return float64(m) + math.Log(kernels.SumExp64(logits, m)) - float64(logits[target])
}

// nllRows is how many positions one parallel item of nllTask scores.
const nllRows = 64

// nllTask scores the positions of one window: nll[i] is the negative
// log-likelihood of targets[i] under row i of logits.
type nllTask struct {
	vocab   int
	logits  []float32
	targets []int
	nll     []float64
}

// Run implements kernels.Task.
func (t *nllTask) Run(_, item int) {
	for i := item * nllRows; i < min(len(t.nll), (item+1)*nllRows); i++ {
		t.nll[i] = NegLogLikelihood(t.logits[i*t.vocab:(i+1)*t.vocab], t.targets[i])
	}
}
