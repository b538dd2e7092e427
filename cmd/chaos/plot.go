package main

import (
	"image/color"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"

	"github.com/sqlretry/sqlretry/cmd/internal/chaos"
)

var lineColors = map[string]color.RGBA{
	"plain":            {R: 0x99, G: 0x99, B: 0x99, A: 0xff},
	"immediate-loop":   {R: 0xe6, G: 0x9f, B: 0x00, A: 0xff},
	"cenkalti-backoff": {R: 0x56, G: 0xb4, B: 0xe9, A: 0xff},
	"sqlretry":         {R: 0x00, G: 0x9e, B: 0x73, A: 0xff},
	"sqlretry-no-cc":   {R: 0xcc, G: 0x79, B: 0xa7, A: 0xff},
	"sqlretry-queue":   {R: 0xd5, G: 0x5e, B: 0x00, A: 0xff},
}

// plotRestart draws committed transactions per second (500 ms windows) over
// the restart or the failover scenario, one line per strategy, with the
// outage shaded.
func plotRestart(file, driverName, scenario string, reports []*chaos.Report) error {
	p := plot.New()
	p.Title.Text = "Committed transactions during a server crash and restart (" + map[string]string{"pgx": "PostgreSQL", "mysql": "MariaDB"}[driverName] + ")"
	down := "server down"
	if scenario == "failover" {
		p.Title.Text = "Committed transactions through a failover (Patroni, 3 PostgreSQL nodes, leader node killed)"
		down = "no node writable"
	}
	p.X.Label.Text = "seconds into the run"
	p.Y.Label.Text = "committed tx/s (500 ms windows)"
	p.Legend.Top = true
	const window = 5 // ticks of 100 ms
	ymax := 1.0
	series := make([]plotter.XYs, len(reports))
	for k, r := range reports {
		var pts plotter.XYs
		for i := 0; i+window <= len(r.Timeline); i += window {
			n := 0
			for _, c := range r.Timeline[i : i+window] {
				n += c
			}
			rate := float64(n) / (float64(window) * r.TickMs / 1000)
			pts = append(pts, plotter.XY{X: float64(i+window) * r.TickMs / 1000, Y: rate})
			ymax = max(ymax, rate)
		}
		series[k] = pts
	}
	ymax *= 1.4 // room for the legend above the lines
	// The outage first, so that the lines are drawn over it.
	if len(reports) > 0 && reports[0].OutageToS > 0 {
		r := reports[0]
		shade, err := plotter.NewPolygon(plotter.XYs{{X: r.OutageFromS, Y: 0}, {X: r.OutageToS, Y: 0}, {X: r.OutageToS, Y: ymax}, {X: r.OutageFromS, Y: ymax}})
		if err != nil {
			return err
		}
		shade.Color = color.NRGBA{R: 0xd5, G: 0x5e, B: 0x00, A: 0x40}
		shade.LineStyle.Width = 0
		p.Add(shade)
		p.Legend.Add(down, shade)
	}
	for k, r := range reports {
		l, err := plotter.NewLine(series[k])
		if err != nil {
			return err
		}
		l.Color = lineColors[r.Strategy]
		l.Width = vg.Points(1.5)
		p.Add(l)
		p.Legend.Add(r.Strategy, l)
	}
	p.Y.Min, p.Y.Max = 0, ymax
	p.Add(plotter.NewGrid())
	return p.Save(9*vg.Inch, 4.5*vg.Inch, file)
}

// plotReplicas draws total committed transactions per second against the
// number of replicas the 16 workers are split into, one line per strategy.
func plotReplicas(file, driverName string, reports []*chaos.Report) error {
	p := plot.New()
	p.Title.Text = "Hot spot, 16 workers split into replicas, each with its own *sql.DB (" + map[string]string{"pgx": "PostgreSQL", "mysql": "MariaDB"}[driverName] + ")"
	p.X.Label.Text = "replicas (×16/replicas workers each)"
	p.Y.Label.Text = "committed tx/s, all replicas"
	p.Legend.Top = true
	series := map[string]plotter.XYs{}
	var order []string
	ymax := 1.0
	for _, r := range reports {
		if _, ok := series[r.Strategy]; !ok {
			order = append(order, r.Strategy)
		}
		series[r.Strategy] = append(series[r.Strategy], plotter.XY{X: float64(max(1, r.Replicas)), Y: r.TxPerSec})
		ymax = max(ymax, r.TxPerSec)
	}
	for _, name := range order {
		l, pts, err := plotter.NewLinePoints(series[name])
		if err != nil {
			return err
		}
		l.Color, pts.Color = lineColors[name], lineColors[name]
		l.Width = vg.Points(1.5)
		p.Add(l, pts)
		p.Legend.Add(name, l, pts)
	}
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.ConstantTicks([]plot.Tick{{Value: 1, Label: "1"}, {Value: 2, Label: "2"}, {Value: 4, Label: "4"}, {Value: 8, Label: "8"}})
	p.Y.Min, p.Y.Max = 0, ymax*1.3
	p.Add(plotter.NewGrid())
	return p.Save(9*vg.Inch, 4.5*vg.Inch, file)
}
