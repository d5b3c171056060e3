//go:build !unix

package desttest

import "testing"

// Mkfifo skips t: named pipes are a unix feature.
func Mkfifo(t testing.TB, _ string) {
	t.Skip("named pipes are a unix feature")
}
