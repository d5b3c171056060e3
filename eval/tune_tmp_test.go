package eval

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/transmla/transmla/internal/sharedtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
)

func TestTuneDecode(t *testing.T) {
	spec := os.Getenv("TUNE")
	if spec == "" {
		t.Skip()
	}
	for _, item := range strings.Split(spec, ",") {
		parts := strings.Split(item, ":")
		dir := parts[0]
		if !strings.HasPrefix(dir, "/") {
			dir = sharedtest.Path(t, filepath.Join("models", dir))
		}
		depth, _ := strconv.Atoi(parts[1])
		m, err := model.LoadWith(context.Background(), dir, model.LoadOptions{KeepDType: true})
		if err != nil {
			t.Fatal(err)
		}
		r, _ := NewRunnerWith(m, kernels.NewNative(), Options{MaxPositions: depth + 400, CacheDType: kernels.RowBF16})
		c := r.NewCache()
		c.Reserve(depth + 400)
		ids := make([]int, depth+1)
		for i := range ids {
			ids[i] = (i * 7919) % m.Config.VocabSize
		}
		logits, _ := r.Forward(context.Background(), c, ids[:max(depth, 1)], false)
		if depth == 0 {
			c.Reset()
		}
		var ts []float64
		for range 300 {
			t0 := time.Now()
			logits, _ = r.ForwardInto(context.Background(), c, []int{5}, false, logits)
			ts = append(ts, time.Since(t0).Seconds())
		}
		slices.Sort(ts)
		fmt.Printf("%s depth %d: min %.3f ms (%.0f tok/s), p10 %.3f, median %.3f ms (%.0f tok/s)\n", filepath.Base(dir), depth, ts[0]*1e3, 1/ts[0], ts[30]*1e3, ts[150]*1e3, 1/ts[150])
	}
}
