package sweep

import (
	"bytes"
	"cmp"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/transmla/transmla/internal/atomicfile"
)

// Row is a point with its figures relative to the original.
type Row struct {
	Point
	// CachePercent is the KV cache per token as a percentage of the
	// original's.
	CachePercent float64 `json:"cache_percent"`
	// DeltaPPLPercent is the perplexity's change from the original's, in
	// percent.
	DeltaPPLPercent float64 `json:"delta_ppl_percent"`
}

// Results is the content of results.json.
type Results struct {
	Setup Setup `json:"setup"`
	// Original is the source model's point; nil until it is evaluated.
	Original *Row `json:"original"`
	// Points are the conversions, by method (the sweep's order, then any
	// other method found in the directory by name) and width.
	Points []Row `json:"points"`
	// PlanSeconds is, per method, the time of the calibration and
	// factorization that its points share (a plan serves all the methods
	// it was built for; each gets its whole time).
	PlanSeconds map[string]float64 `json:"plan_seconds"`
}

// Files the sweep writes in its directory.
const (
	resultsJSON = "results.json"
	resultsCSV  = "results.csv"
	resultsMD   = "results.md"
	pplPlot     = "ppl_vs_cache" // .png and .svg
)

// csvHeader names results.csv's columns (documented in README.md).
var csvHeader = []string{
	"method", "dc", "rope_dim", "cache_values_per_token", "cache_bytes_per_token", "cache_percent",
	"ppl", "delta_ppl_percent", "mean_nll", "tokens_scored", "windows", "retained",
	"convert_seconds", "eval_seconds", "cache_budget", "rope_stride", "freqfold", "held_out_ppl",
}

// rebuild collects every saved point of the current setup and rewrites
// the results files and plots from them.
func (r *runner) rebuild() (*Results, error) {
	res := &Results{Setup: r.setup, Points: []Row{}, PlanSeconds: map[string]float64{}}
	if f, ok := r.st.points[pointPath(r.c.Dir, originalName, 0)]; ok {
		res.Original = &Row{Point: f.Point, CachePercent: 100}
	}
	for _, f := range r.st.points {
		if f.Method == originalName {
			continue
		}
		row := Row{Point: f.Point}
		if o := res.Original; o != nil {
			row.CachePercent = 100 * float64(row.CacheValuesPerToken) / float64(o.CacheValuesPerToken)
			row.DeltaPPLPercent = 100 * (row.PPL/o.PPL - 1)
		}
		res.Points = append(res.Points, row)
	}
	order := func(name string) int {
		if i := slices.IndexFunc(r.c.Methods, func(m Method) bool { return m.Name == name }); i >= 0 {
			return i
		}
		return len(r.c.Methods)
	}
	slices.SortFunc(res.Points, func(a, b Row) int {
		return cmp.Or(cmp.Compare(order(a.Method), order(b.Method)), cmp.Compare(a.Method, b.Method), cmp.Compare(a.Cache, b.Cache), cmp.Compare(a.DC, b.DC))
	})
	spectra := make([]spectraFile, 0, len(r.st.spectra))
	for _, f := range r.st.spectra {
		res.PlanSeconds[f.Method] = f.PlanSeconds
		spectra = append(spectra, f)
	}
	slices.SortFunc(spectra, func(a, b spectraFile) int {
		return cmp.Or(cmp.Compare(order(a.Method), order(b.Method)), cmp.Compare(a.Method, b.Method))
	})

	data, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{resultsJSON: append(data, '\n'), resultsMD: res.markdown()}
	if files[resultsCSV], err = res.csv(); err != nil {
		return nil, err
	}
	model := filepath.Base(filepath.Clean(r.setup.Model))
	for _, format := range []string{"png", "svg"} {
		if files[pplPlot+"."+format], err = res.pplPlot(model, format); err != nil {
			return nil, err
		}
		for _, s := range spectra {
			if files[spectraPlotName(s.Method)+"."+format], err = spectraPlot(model, s, format); err != nil {
				return nil, err
			}
		}
	}
	for name, data := range files {
		if err := atomicfile.WriteFile(filepath.Join(r.c.Dir, name), data, 0o644); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// rows is the original (if evaluated) followed by the points.
func (res *Results) rows() []Row {
	var rows []Row
	if res.Original != nil {
		rows = append(rows, *res.Original)
	}
	return append(rows, res.Points...)
}

func (res *Results) csv() ([]byte, error) {
	var b bytes.Buffer
	w := csv.NewWriter(&b)
	w.Write(csvHeader)
	f := func(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }
	for _, r := range res.rows() {
		dc, ropeDim, retained := "", "", ""
		if r.Method != originalName {
			dc, ropeDim, retained = strconv.Itoa(r.DC), strconv.Itoa(r.RopeDim), f(r.Retained)
		}
		budget, stride, fold, held := "", "", "", ""
		if r.Cache > 0 {
			budget, stride, fold, held = strconv.Itoa(r.Cache), f(r.RopeStride), strconv.Itoa(r.FreqFold), f(r.HeldOutPPL)
		}
		w.Write([]string{
			r.Method, dc, ropeDim, strconv.Itoa(r.CacheValuesPerToken), strconv.FormatInt(r.CacheBytesPerToken, 10), f(r.CachePercent),
			f(r.PPL), f(r.DeltaPPLPercent), f(r.MeanNLL), strconv.Itoa(r.TokensScored), strconv.Itoa(r.Windows), retained,
			f(r.ConvertSeconds), f(r.EvalSeconds), budget, stride, fold, held,
		})
	}
	w.Flush()
	return b.Bytes(), w.Error()
}

func (res *Results) markdown() []byte {
	var b bytes.Buffer
	s := res.Setup
	fmt.Fprintf(&b, "# d_c sweep of %s\n\n", filepath.Base(s.Model))
	if c := s.Calibration; c != nil {
		fmt.Fprintf(&b, "Calibrated on %s (%d tokens in sequences of %d, seed %d, sha256 %.12s…). ", filepath.Base(c.File), c.Tokens, c.SeqLen, c.Seed, c.SHA256)
	} else {
		b.WriteString("Data-free (no calibration). ")
	}
	windows := "all windows"
	switch {
	case s.MaxWindows == 1:
		windows = "the first window"
	case s.MaxWindows > 1:
		windows = fmt.Sprintf("the first %d windows", s.MaxWindows)
	}
	fmt.Fprintf(&b, "Perplexity on %s, %s of %d tokens", filepath.Base(s.Data), windows, s.Ctx)
	if o := res.Original; o != nil {
		fmt.Fprintf(&b, " (%d windows, %d tokens scored)", o.Windows, o.TokensScored)
	}
	fmt.Fprintf(&b, "; converted weights stored as %s.\n\n", s.DType)
	budgets := slices.ContainsFunc(res.Points, func(r Row) bool { return r.Cache > 0 })
	if budgets {
		b.WriteString("| series | cache/token/layer | d_c | d_r | stride | freqfold | held-out ppl | cache values/token | cache % of original | ppl | Δppl % | time (s) |\n")
		b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	} else {
		b.WriteString("| method | d_c | cache values/token | cache % of original | ppl | Δppl % | time (s) |\n")
		b.WriteString("|---|---|---|---|---|---|---|\n")
	}
	for _, r := range res.rows() {
		dc, pct, delta := "—", "—", "—"
		if r.Method != originalName {
			dc = strconv.Itoa(r.DC)
		}
		if res.Original != nil {
			pct, delta = fmt.Sprintf("%.1f", r.CachePercent), fmt.Sprintf("%+.2f", r.DeltaPPLPercent)
		}
		if budgets {
			budget, dr, stride, fold, held := "—", "—", "—", "—", "—"
			if r.Cache > 0 {
				budget, dr = strconv.Itoa(r.Cache), strconv.Itoa(r.RopeDim)
				stride, fold, held = strconv.FormatFloat(r.RopeStride, 'g', -1, 64), strconv.Itoa(r.FreqFold), fmt.Sprintf("%.4f", r.HeldOutPPL)
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %d | %s | %.4f | %s | %.1f |\n", r.Method, budget, dc, dr, stride, fold, held, r.CacheValuesPerToken, pct, r.PPL, delta, r.ConvertSeconds+r.EvalSeconds)
			continue
		}
		fmt.Fprintf(&b, "| %s | %s | %d | %s | %.4f | %s | %.1f |\n", r.Method, dc, r.CacheValuesPerToken, pct, r.PPL, delta, r.ConvertSeconds+r.EvalSeconds)
	}
	methods := make([]string, 0, len(res.PlanSeconds))
	for m := range res.PlanSeconds {
		methods = append(methods, m)
	}
	slices.Sort(methods)
	for _, m := range methods {
		fmt.Fprintf(&b, "\n%s: calibration and factorization shared by its points took %.1f s.", m, res.PlanSeconds[m])
	}
	b.WriteString("\nTime per point: building it from the shared factorization plus its evaluation.\n")
	return b.Bytes()
}
