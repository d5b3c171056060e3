package eval

import (
	"context"
	"fmt"
	"slices"
)

// GenerateOptions controls greedy decoding.
type GenerateOptions struct {
	// MaxTokens is the number of new tokens to produce at most.
	MaxTokens int
	// StopIDs end generation when produced (the stop token is included).
	StopIDs []int
}

// Greedy decodes with argmax from prompt, using the KV cache: the prompt is
// run once, then one token per step. It returns the new tokens only.
func Greedy(ctx context.Context, r *Runner, prompt []int, opt GenerateOptions) ([]int, error) {
	if len(prompt) == 0 {
		return nil, fmt.Errorf("generate: empty prompt (the tokenizer adds no BOS; give a prompt)")
	}
	if opt.MaxTokens < 0 {
		return nil, fmt.Errorf("generate: %d new tokens asked for; give 0 or more", opt.MaxTokens)
	}
	// The last new token is produced, never run through the model: it
	// takes no position.
	if need := len(prompt) + max(opt.MaxTokens-1, 0); need > r.MaxPositions() {
		return nil, fmt.Errorf("generate: prompt %d + %d new tokens need %d positions, which exceed the runner's %d", len(prompt), opt.MaxTokens, need, r.MaxPositions())
	}
	cache := r.NewCache()
	cache.Reserve(len(prompt) + opt.MaxTokens)
	logits, err := r.Forward(ctx, cache, prompt, false)
	if err != nil {
		return nil, err
	}
	out := make([]int, 0, opt.MaxTokens)
	step := []int{0}
	for len(out) < opt.MaxTokens {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		next := Argmax(logits)
		out = append(out, next)
		if slices.Contains(opt.StopIDs, next) || len(out) == opt.MaxTokens {
			break
		}
		// The step's logits go where the last ones were: no allocation
		// per token.
		step[0] = next
		if logits, err = r.ForwardInto(ctx, cache, step, false, logits); err != nil {
			return out, err
		}
	}
	return out, nil
}

// Argmax returns the index of the largest value, the first one on ties
// (as torch.argmax on CPU).
func Argmax(x []float32) int {
	best := 0
	for i, v := range x {
		if v > x[best] {
			best = i
		}
	}
	return best
}
