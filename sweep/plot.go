package sweep

import (
	"bytes"
	"fmt"
	"image/color"
	"math"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// pplPlot draws perplexity against the KV cache kept, one series per
// method with each point labelled by its d_c, and the original's
// perplexity as a dashed reference line.
func (res *Results) pplPlot(model, format string) ([]byte, error) {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s: perplexity against KV cache", model)
	p.X.Label.Text = "KV cache per token (% of original)"
	p.Y.Label.Text = "perplexity"
	p.Title.Padding = vg.Points(8)
	// Past 100 % for the labels of the widest points.
	const xMax = 112
	p.X.Min, p.X.Max = 0, xMax
	p.X.Tick.Marker = plainTicks{}
	p.Y.Tick.Marker = plainTicks{}
	p.Add(plotter.NewGrid())
	p.Legend.Top = true
	lo, hi := math.Inf(1), math.Inf(-1)
	var methods []string
	series := map[string]plotter.XYs{}
	labels := map[string][]string{}
	for _, r := range res.Points {
		if _, ok := series[r.Method]; !ok {
			methods = append(methods, r.Method)
		}
		series[r.Method] = append(series[r.Method], plotter.XY{X: r.CachePercent, Y: r.PPL})
		label := fmt.Sprintf("d_c %d", r.DC)
		if r.Cache > 0 {
			label = fmt.Sprintf("%d+%d", r.DC, r.RopeDim)
		}
		labels[r.Method] = append(labels[r.Method], label)
		lo, hi = math.Min(lo, r.PPL), math.Max(hi, r.PPL)
	}
	if res.Original != nil {
		o := res.Original.PPL
		ref, err := plotter.NewLine(plotter.XYs{{X: 0, Y: o}, {X: xMax, Y: o}})
		if err != nil {
			return nil, err
		}
		ref.Dashes = []vg.Length{vg.Points(6), vg.Points(3)}
		ref.Color = color.Gray{Y: 80}
		p.Add(ref)
		p.Legend.Add(fmt.Sprintf("original (GQA): %.2f", o), ref)
		lo, hi = math.Min(lo, o), math.Max(hi, o)
	}
	for i, m := range methods {
		xys := series[m]
		line, points, err := plotter.NewLinePoints(xys)
		if err != nil {
			return nil, err
		}
		line.Color, points.Color = plotutil.Color(i), plotutil.Color(i)
		points.Shape = plotutil.Shape(i)
		lbl, err := plotter.NewLabels(plotter.XYLabels{XYs: xys, Labels: labels[m]})
		if err != nil {
			return nil, err
		}
		for j := range lbl.TextStyle {
			lbl.TextStyle[j].Font.Size = vg.Points(8)
			lbl.TextStyle[j].Color = plotutil.Color(i)
		}
		lbl.Offset = vg.Point{X: vg.Points(4), Y: vg.Points(3)}
		p.Add(line, points, lbl)
		p.Legend.Add(m, line, points)
	}
	if lo <= hi {
		pad := 0.05 * (hi - lo)
		// Room above the points for their labels and the legend.
		p.Y.Min, p.Y.Max = lo-pad, hi+5*pad
	}
	return render(format, 8*vg.Inch, 5*vg.Inch, func(c draw.Canvas) { p.Draw(c) })
}

// spectraPlotName is the file name, without extension, of method's
// spectra plot.
func spectraPlotName(method string) string { return "spectra-" + method }

// spectraPlot draws, per layer, the fraction of the weighted energy that
// a latent of each rank keeps: the joint latent of [K_nope; V] (up to the
// largest width swept), and K_nope and V each factored alone.
func spectraPlot(model string, s spectraFile, format string) ([]byte, error) {
	n := len(s.Layers)
	if n == 0 {
		return nil, fmt.Errorf("spectra of %s: no layers", s.Method)
	}
	cols := min(n, 3)
	rows := (n + cols - 1) / cols
	plots := make([][]*plot.Plot, rows)
	for i := range plots {
		plots[i] = make([]*plot.Plot, cols)
	}
	for li, l := range s.Layers {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("layer %d", l.Layer)
		p.X.Label.Text = "rank"
		p.X.Tick.Marker = plainTicks{}
		p.Y.Label.Text = "energy kept"
		p.Y.Min, p.Y.Max = 0, 1
		p.Add(plotter.NewGrid())
		p.Legend.Top, p.Legend.Left = false, false
		p.Legend.YOffs = vg.Points(8)
		for i, c := range []struct {
			name string
			kept []float64
		}{{"joint K_nope+V", l.Joint}, {"K_nope alone", l.KeyNope}, {"V alone", l.Value}} {
			if len(c.kept) == 0 {
				continue
			}
			xys := make(plotter.XYs, len(c.kept)+1) // rank 0 keeps nothing
			for r, v := range c.kept {
				xys[r+1] = plotter.XY{X: float64(r + 1), Y: v}
			}
			line, err := plotter.NewLine(xys)
			if err != nil {
				return nil, err
			}
			line.Color = plotutil.Color(i)
			line.Dashes = plotutil.Dashes(i)
			line.Width = vg.Points(1.5)
			p.Add(line)
			if li == 0 {
				p.Legend.Add(c.name, line)
			}
		}
		plots[li/cols][li%cols] = p
	}
	const panelW, panelH = 3.6 * vg.Inch, 2.8 * vg.Inch
	title := fmt.Sprintf("%s, %s: weighted energy kept against rank", model, s.Method)
	return render(format, vg.Length(cols)*panelW, vg.Length(rows)*panelH+0.4*vg.Inch, func(c draw.Canvas) {
		top := c.Max.Y - 0.4*vg.Inch
		tc := c
		tc.Min.Y = top
		tc.FillText(draw.TextStyle{Color: color.Black, Font: font.From(plot.DefaultFont, 14), Handler: plot.DefaultTextHandler, XAlign: draw.XCenter, YAlign: draw.YCenter},
			vg.Point{X: (c.Min.X + c.Max.X) / 2, Y: (top + c.Max.Y) / 2}, title)
		body := c
		body.Max.Y = top
		tiles := draw.Tiles{Rows: rows, Cols: cols, PadX: vg.Millimeter, PadY: vg.Millimeter,
			PadTop: vg.Points(2), PadBottom: vg.Points(4), PadLeft: vg.Points(4), PadRight: vg.Points(8)}
		canvases := plot.Align(plots, tiles, body)
		for i := range plots {
			for j, p := range plots[i] {
				if p != nil {
					p.Draw(canvases[i][j])
				}
			}
		}
	})
}

// plainTicks are plot's default ticks labelled without trailing zeros
// (ranks and percentages read "25", not "25.00").
type plainTicks struct{}

func (plainTicks) Ticks(min, max float64) []plot.Tick {
	ticks := plot.DefaultTicks{}.Ticks(min, max)
	for i, t := range ticks {
		if t.Label != "" {
			ticks[i].Label = strconv.FormatFloat(t.Value, 'f', -1, 64)
		}
	}
	return ticks
}

// render paints onto a w×h canvas of format (png or svg) and encodes it.
func render(format string, w, h vg.Length, paint func(draw.Canvas)) ([]byte, error) {
	c, err := draw.NewFormattedCanvas(w, h, format)
	if err != nil {
		return nil, err
	}
	paint(draw.New(c))
	var b bytes.Buffer
	if _, err := c.WriteTo(&b); err != nil {
		return nil, fmt.Errorf("encode %s plot: %w", format, err)
	}
	return b.Bytes(), nil
}
