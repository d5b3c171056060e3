package kernels

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// countTask counts the runs of each item and checks the worker index.
type countTask struct {
	t       *testing.T
	threads int
	runs    []atomic.Int32
	inner   func(w, i int)
}

func (c *countTask) Run(w, i int) {
	if w < 0 || w >= c.threads {
		c.t.Errorf("item %d ran on worker %d of %d", i, w, c.threads)
	}
	c.runs[i].Add(1)
	if c.inner != nil {
		c.inner(w, i)
	}
}

func (c *countTask) check(what string) {
	c.t.Helper()
	for i := range c.runs {
		if n := c.runs[i].Load(); n != 1 {
			c.t.Fatalf("%s: item %d ran %d times", what, i, n)
		}
	}
}

// TestParallel runs every item exactly once, for item counts around the
// thread count, again and again (calls follow each other faster than the
// helpers go to sleep, and after they did), nested and from concurrent
// callers.
func TestParallel(t *testing.T) {
	procs := runtime.GOMAXPROCS(0)
	for _, threads := range []int{0, 1, 2, 3, procs + 3} {
		for _, n := range []int{0, 1, 2, 3, 7, 64, 1000} {
			for rep := range 20 {
				eff := threads
				if eff <= 0 {
					eff = procs
				}
				c := &countTask{t: t, threads: max(1, min(eff, procs, max(n, 1))), runs: make([]atomic.Int32, n)}
				Parallel(threads, n, c)
				c.check("plain")
				if rep == 10 {
					runtime.Gosched()
				}
			}
		}
	}
	// A task that calls Parallel runs the inner call on its own goroutine.
	outer := &countTask{t: t, threads: procs, runs: make([]atomic.Int32, 8)}
	var inners [8]*countTask
	outer.inner = func(w, i int) {
		inners[i] = &countTask{t: t, threads: 1, runs: make([]atomic.Int32, 50)}
		Parallel(0, 50, inners[i])
	}
	Parallel(0, 8, outer)
	outer.check("outer")
	for _, c := range inners {
		c.check("inner")
	}
	// Concurrent callers: one owns the helpers, the others run alone.
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				c := &countTask{t: t, threads: procs, runs: make([]atomic.Int32, 33)}
				Parallel(0, 33, c)
				c.check("concurrent")
			}
		}()
	}
	wg.Wait()
}

type nopTask struct{ sum atomic.Int64 }

func (n *nopTask) Run(_, i int) { n.sum.Add(int64(i)) }

// TestParallelAllocatesNothing: a call with a reused task allocates
// nothing.
func TestParallelAllocatesNothing(t *testing.T) {
	task := &nopTask{}
	if a := testing.AllocsPerRun(100, func() { Parallel(0, 16, task) }); a != 0 {
		t.Errorf("%v allocations per call", a)
	}
}

// BenchmarkParallelCall is the cost of one call of two items: what a
// decode step pays per parallel product.
func BenchmarkParallelCall(b *testing.B) {
	task := &nopTask{}
	for b.Loop() {
		Parallel(0, 2, task)
	}
}

// A task that panics on the caller's goroutine leaves the pool usable:
// once the panic is recovered, the call is closed, its helpers out and the
// next call runs on the pool again, not serially for ever.
func TestParallelRecoversFromAPanickingTask(t *testing.T) {
	if runtime.GOMAXPROCS(0) < 2 {
		t.Skip("the pool needs two cores")
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("the panic was lost")
			}
		}()
		Parallel(2, 64, TaskFunc(func(w, i int) {
			if w == 0 {
				panic("task failed")
			}
		}))
	}()
	if !workers.mu.TryLock() {
		t.Fatal("the pool is still locked after the panic: every later call would run serially")
	}
	workers.mu.Unlock()
	if workers.open.Load() || workers.active.Load() != 0 {
		t.Fatal("the panicked call is still open")
	}
	var ran atomic.Int64
	Parallel(2, 100, TaskFunc(func(_, _ int) { ran.Add(1) }))
	if ran.Load() != 100 {
		t.Fatalf("the next call ran %d of 100 items", ran.Load())
	}
}
