package kernels

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Task is work split into numbered items that may run in parallel: Run is
// called once for every item i in [0, n) of a Parallel call, by worker w
// (0 is the caller, 1… the helpers; w < Parallel's threads), so that a
// task can keep scratch per worker. A Task that is a pointer to a reused
// struct makes a parallel loop allocation-free.
type Task interface {
	Run(w, i int)
}

// Parallel runs t's items 0…n−1 on up to threads goroutines (0 means
// GOMAXPROCS) and returns when all are done. Items are handed out one at a
// time, so a core slowed by other work simply takes fewer of them. The
// helpers are long-lived goroutines that spin briefly between calls, so a
// call costs about a microsecond instead of a goroutine start and wake-up:
// what keeps a decode step's thirty-odd small products fast. A call made
// while another is running (from another goroutine, or from inside a task)
// runs its items on the calling goroutine alone.
func Parallel(threads, n int, t Task) {
	if threads <= 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	threads = min(threads, n, runtime.GOMAXPROCS(0))
	if threads <= 1 || !workers.mu.TryLock() {
		for i := range n {
			t.Run(0, i)
		}
		return
	}
	defer workers.mu.Unlock()
	workers.run(threads, n, t)
}

// TaskFunc adapts a function to a Task. A closure costs an allocation per
// call, which suits work (a prefill) that dwarfs it; decode steps use
// reused Task structs.
type TaskFunc func(w, i int)

// Run implements Task.
func (f TaskFunc) Run(w, i int) { f(w, i) }

// workers is the process's one set of helper goroutines. It is shared on
// purpose: two sets would spin against each other on the same cores.
var workers pool

// spinFor is how long an idle helper keeps polling for the next call
// before it blocks: longer than the gaps between the products of one
// decode step, short enough not to hold a core from other processes.
const spinFor = 50 * time.Microsecond

// pool hands the items of one Parallel call at a time to its helpers.
type pool struct {
	// mu is held by the caller of the running Parallel call.
	mu      sync.Mutex
	helpers []*helper
	// gen counts calls; a helper that sees it change looks at the call.
	gen atomic.Uint64
	// The running call: its task, item count and participants (the
	// caller and the helpers 1…threads−1). open turns false once every
	// item has been taken; active counts helpers inside the call.
	task    Task
	n       int
	threads int
	next    atomic.Int64
	open    atomic.Bool
	active  atomic.Int32
	// waiting says the caller blocks on done for the last helper, which
	// then sends: a helper descheduled mid-item (other processes on the
	// cores) is not waited for by spinning against it.
	waiting atomic.Bool
	done    chan struct{}
}

// helper is one long-lived goroutine of the pool.
type helper struct {
	id       int
	sleeping atomic.Bool
	wake     chan struct{}
}

// run executes one call; p.mu is held.
func (p *pool) run(threads, n int, t Task) {
	if p.done == nil {
		p.done = make(chan struct{}, 1)
	}
	for len(p.helpers) < threads-1 {
		h := &helper{id: len(p.helpers) + 1, wake: make(chan struct{}, 1)}
		p.helpers = append(p.helpers, h)
		go p.serve(h)
	}
	p.task, p.n, p.threads = t, n, threads
	p.next.Store(0)
	p.open.Store(true)
	p.gen.Add(1)
	for _, h := range p.helpers[:threads-1] {
		if h.sleeping.Load() {
			select {
			case h.wake <- struct{}{}:
			default:
			}
		}
	}
	// Deferred, so that a task panicking on the caller still leaves the
	// pool closed, its helpers out and the lock free for the next call.
	defer p.finish()
	for {
		i := int(p.next.Add(1) - 1)
		if i >= n {
			break
		}
		t.Run(0, i)
	}
}

// finish ends the running call once every item is taken or the caller's
// task panicked: helpers that have not joined yet must not (they would
// read the next call's fields), and those inside finish their items.
func (p *pool) finish() {
	p.open.Store(false)
	var start time.Time
	for spins := 0; p.active.Load() != 0; spins++ {
		if spins%256 != 255 {
			continue
		}
		if start.IsZero() {
			start = time.Now()
		}
		if time.Since(start) < spinFor {
			continue
		}
		p.waiting.Store(true)
		if p.active.Load() != 0 {
			<-p.done // a stale wake-up only makes the loop look again
		}
		p.waiting.Store(false)
	}
	p.task = nil
}

// serve is a helper's loop: wait for a call, take items while they last.
func (p *pool) serve(h *helper) {
	seen := p.gen.Load()
	for {
		seen = p.await(h, seen)
		p.active.Add(1)
		// Seen after joining, open means the caller is still handing out
		// items and will wait for this helper before the next call.
		if p.open.Load() && h.id < p.threads {
			t, n := p.task, p.n
			for {
				i := int(p.next.Add(1) - 1)
				if i >= n {
					break
				}
				t.Run(h.id, i)
			}
		}
		if p.active.Add(-1) == 0 && p.waiting.Load() {
			select {
			case p.done <- struct{}{}:
			default:
			}
		}
	}
}

// await returns the call generation once it differs from seen: spinning
// for spinFor, then blocking until the next call wakes the helper.
func (p *pool) await(h *helper, seen uint64) uint64 {
	start := time.Now()
	for spins := 0; ; spins++ {
		if g := p.gen.Load(); g != seen {
			return g
		}
		if spins%256 != 255 {
			continue
		}
		if time.Since(start) < spinFor {
			runtime.Gosched()
			continue
		}
		h.sleeping.Store(true)
		// A call published after the store above finds sleeping set and
		// sends a wake-up; one published before it is seen here.
		if g := p.gen.Load(); g != seen {
			h.sleeping.Store(false)
			return g
		}
		<-h.wake
		h.sleeping.Store(false)
		start = time.Now()
	}
}
