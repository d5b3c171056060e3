package main

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/transmla/transmla/internal/atomicfile"
)

func tokenizeCommand() *cli.Command {
	return withUsageErrors(&cli.Command{
		Name:      "tokenize",
		Usage:     "count (and optionally write) the tokens of a text file with a model's tokenizer",
		ArgsUsage: "MODEL",
		Description: `Encodes --data exactly as eval does (special tokens only where the
tokenizer's post-processor adds them). --ids-out writes the ids as a JSON array
on one line, for scripts that compare with another tokenizer: a regular file is replaced atomically
(through a symbolic link, whose target is replaced); a device or named pipe, such
as /dev/stdout, is written to as it is.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "data", Usage: "text file to encode (required)"},
			&cli.StringFlag{Name: "ids-out", Usage: "write the token ids to this file as a JSON array"},
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object instead of text"},
		},
		Action: func(c *cli.Context) error {
			if err := requireFlags(c, "data"); err != nil {
				return err
			}
			dir, err := modelArg(c)
			if err != nil {
				return err
			}
			if err := checkIDsOut(c, dir); err != nil {
				return err
			}
			tok, err := loadTokenizer(dir)
			if err != nil {
				return err
			}
			text, err := readData(c)
			if err != nil {
				return err
			}
			start := time.Now()
			ids := tok.Encode(text, true)
			if ids == nil {
				ids = []int{} // an empty file is an empty array, not null
			}
			secs := time.Since(start).Seconds()
			if out := c.String("ids-out"); out != "" {
				data, err := json.Marshal(ids)
				if err != nil {
					return err
				}
				// A final newline keeps the line that follows on a
				// shared stream (--ids-out /dev/stdout) apart.
				if err := atomicfile.WriteFile(out, append(data, '\n'), 0o644); err != nil {
					return err
				}
			}
			if c.Bool("json") {
				return writeJSON(c.App.Writer, map[string]any{"tokens": len(ids), "bytes": len(text), "seconds": secs})
			}
			fmt.Fprintf(c.App.Writer, "%d tokens (%d bytes, %.2f s)\n", len(ids), len(text), secs)
			return nil
		},
	})
}

// checkIDsOut refuses an --ids-out that would replace an input (the
// --data file, or a file of the model) or, with --json, share standard
// output with the JSON object.
func checkIDsOut(c *cli.Context, model string) error {
	out := c.String("ids-out")
	if out == "" {
		return nil
	}
	if atomicfile.Inside(out, c.String("data")) || atomicfile.Inside(out, model) {
		return usagef("--ids-out %s is the --data file or lies inside the model %s; write the ids elsewhere", out, model)
	}
	if stdout, ok := c.App.Writer.(*os.File); ok && c.Bool("json") {
		outInfo, errOut := os.Stat(out)
		stdoutInfo, errStd := stdout.Stat()
		if errOut == nil && errStd == nil && os.SameFile(outInfo, stdoutInfo) {
			return usagef("--ids-out %s is standard output, where --json prints its object; give one of them", out)
		}
	}
	return nil
}
