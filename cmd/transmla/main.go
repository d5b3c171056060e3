// Command transmla loads Grouped-Query-Attention checkpoints and measures
// them (perplexity, throughput, KV-cache size), the first steps of
// retrofitting Multi-head Latent Attention into them.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/kernels"
)

// Exit codes, documented in README.md.
const (
	exitOK          = 0
	exitError       = 1 // bad input file, failed run
	exitUsage       = 2 // bad flags or arguments
	exitInterrupted = 130
)

// version is what --version prints.
const version = "0.1.0"

// usageError marks errors in how the command was called.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// After the first signal, restore the default handling so that a second
	// Ctrl-C kills the process even while a long step winds down.
	context.AfterFunc(ctx, stop)
	app := newApp(os.Stdout, os.Stderr)
	err := app.RunContext(ctx, flagsFirst(app, os.Args))
	stop()
	os.Exit(exitCode(ctx, err, os.Stderr))
}

func exitCode(ctx context.Context, err error, stderr io.Writer) int {
	if err == nil {
		return exitOK
	}
	fmt.Fprintf(stderr, "transmla: %v\n", err)
	var ue usageError
	var ce cli.ExitCoder // urfave/cli's own errors: help for an unknown command
	switch {
	case errors.Is(err, context.Canceled) && ctx.Err() != nil:
		return exitInterrupted
	case errors.As(err, &ue), errors.As(err, &ce):
		return exitUsage
	default:
		return exitError
	}
}

func newApp(stdout, stderr io.Writer) *cli.App {
	return &cli.App{
		Name:      "transmla",
		Usage:     "retrofit Multi-head Latent Attention into GQA checkpoints and measure them",
		Version:   version,
		Writer:    stdout,
		ErrWriter: stderr,
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "threads", Usage: "CPU threads for compute (the default is every core)", Value: runtime.NumCPU()},
			&cli.StringFlag{Name: "blas", Usage: "matrix-product backend: auto (fastest measured per shape), go (built-in kernels), openblas (loaded at run time)", Value: "auto"},
		},
		Before: func(c *cli.Context) error {
			if n := c.Int("threads"); n > 0 {
				runtime.GOMAXPROCS(n)
			} else {
				return usagef("--threads must be positive, got %d", n)
			}
			// Checked for every command, also those that compute nothing,
			// so that a misspelt backend never passes silently.
			if b := c.String("blas"); !slices.Contains(kernels.BackendNames(), b) {
				return usagef("--blas: unknown backend %q (want one of %s)", b, strings.Join(kernels.BackendNames(), ", "))
			}
			return nil
		},
		// Runs only when the first argument is not a command.
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usagef("unknown command %q (see transmla --help)", c.Args().First())
			}
			return cli.ShowAppHelp(c)
		},
		OnUsageError:   onUsageError,
		ExitErrHandler: func(*cli.Context, error) {}, // main decides the exit code
		Commands: []*cli.Command{
			demoCommand(),
			convertCommand(),
			evalCommand(),
			benchCommand(),
			inspectCommand(),
			generateCommand(),
			synthCommand(),
			sweepCommand(),
			tokenizeCommand(),
		},
	}
}

// withUsageErrors makes a command's flag errors exit with exitUsage.
func withUsageErrors(cmd *cli.Command) *cli.Command {
	cmd.OnUsageError = onUsageError
	return cmd
}

func onUsageError(_ *cli.Context, err error, _ bool) error { return usageError{err} }
