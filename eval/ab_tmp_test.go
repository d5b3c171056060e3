package eval

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/transmla/transmla/internal/sharedtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
)

func TestABWindow(t *testing.T) {
	if os.Getenv("ABWIN") == "" {
		t.Skip()
	}
	dir := sharedtest.Path(t, filepath.Join("models", "llama-gqa-25m"))
	m16, _ := model.LoadWith(context.Background(), dir, model.LoadOptions{KeepDType: true})
	m32, _ := model.Load(context.Background(), dir, nil)
	ids := make([]int, 1024)
	for i := range ids {
		ids[i] = (i * 7919) % 4096
	}
	var rs []*Runner
	for _, m := range []*model.Model{m32, m16} {
		r, _ := NewRunner(m, kernels.NewNative(), 1024)
		rs = append(rs, r)
	}
	times := make([][]float64, 2)
	for range 8 {
		for i, r := range rs {
			c := r.NewCache()
			t0 := time.Now()
			r.Forward(context.Background(), c, ids, true)
			times[i] = append(times[i], time.Since(t0).Seconds())
		}
	}
	for i, n := range []string{"f32", "bf16"} {
		slices.Sort(times[i])
		fmt.Printf("%s: min %.1f ms, median %.1f ms\n", n, times[i][0]*1e3, times[i][4]*1e3)
	}
}

func TestABPerplexity(t *testing.T) {
	if os.Getenv("ABPPL") == "" {
		t.Skip()
	}
	dir := sharedtest.Path(t, filepath.Join("models", "llama-gqa-25m"))
	m16, _ := model.LoadWith(context.Background(), dir, model.LoadOptions{KeepDType: true})
	ids := make([]int, 1024*4)
	for i := range ids {
		ids[i] = (i * 7919) % 4096
	}
	r, _ := NewRunner(m16, kernels.NewNative(), 1024)
	for range 3 {
		res, _ := Perplexity(context.Background(), r, ids, PerplexityOptions{Ctx: 1024})
		fmt.Printf("ppl %.1f tokens/s\n", res.TokensPerSecond)
	}
}
