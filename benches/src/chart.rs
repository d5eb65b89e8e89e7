//! The SVG chart of each path's ratios to `direct` (plotters' SVG backend).

use plotters::prelude::*;

use crate::metric::Metric;
use crate::report::{PathKind, Report};

/// The figures charted: rates (higher is better) and latencies (lower is better). Cost
/// figures are left out: `direct` has no balancer process, so they have no ratio to it.
const CHARTED: [(Metric, &str); 8] = [
    (Metric::Bulk1, "bulk 1 flow"),
    (Metric::Bulk8, "bulk 8 flows"),
    (Metric::ConnRate, "new conn/s"),
    (Metric::KeepAliveRate, "kept-alive req/s"),
    (Metric::UdpRate, "UDP dgram/s"),
    (Metric::UdpP50, "UDP p50 (lower better)"),
    (Metric::UdpP99, "UDP p99 (lower better)"),
    (Metric::PacketRate, "64-byte pkt/s"),
];

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Renders grouped bars, one group per charted figure and one bar per path that ran (except
/// `direct`, which is the 1.0 line), as an SVG document.
///
/// Returns `Err` with plotters' message when drawing fails.
pub fn ratios_svg(report: &Report) -> Result<String, String> {
    let paths: Vec<_> = report
        .paths
        .iter()
        .filter(|p| p.skipped.is_none() && p.kind != PathKind::Baseline)
        .collect();
    let ratios: Vec<Vec<Option<f64>>> = paths
        .iter()
        .map(|p| {
            CHARTED
                .iter()
                .map(|(m, _)| report.ratio_to_direct(p, *m))
                .collect()
        })
        .collect();
    let top = ratios
        .iter()
        .flatten()
        .flatten()
        .fold(1.0f64, |a, &b| a.max(b))
        * 1.15;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1100, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let n = CHARTED.len() as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                // A -bridge path's ratio is to direct-bridge, a tc path's to the direct run
                // beside it (Report::ratio_to_direct).
                format!(
                    "lb bench: ratio to direct of the path's topology ({} UTC)",
                    report.date_utc
                ),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(CHARTED.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < CHARTED.len() {
                    CHARTED[i as usize].1.to_string()
                } else {
                    String::new()
                }
            })
            .y_desc("value / direct")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                [(-0.5, 1.0), (n - 0.5, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(|e| e.to_string())?
            .label("direct = 1.0")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
        let width = 0.8 / paths.len().max(1) as f64;
        for (k, (path, row)) in paths.iter().zip(&ratios).enumerate() {
            let color = COLORS[k % COLORS.len()];
            let bars = row.iter().enumerate().filter_map(|(i, r)| {
                let r = (*r)?;
                let left = i as f64 - 0.4 + k as f64 * width;
                Some(Rectangle::new(
                    [(left, 0.0), (left + width * 0.9, r)],
                    color.filled(),
                ))
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(path.name.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Figure, Machine, PathReport};

    #[test]
    fn the_chart_has_a_bar_per_measured_ratio_and_names_every_path() {
        let path = |name: &str, kind, v: f64| PathReport {
            name: name.into(),
            network: crate::topology::Network::Veth,
            kind,
            skipped: None,
            figures: [(Metric::Bulk1, Figure::new(vec![v; 3]))].into(),
            notes: vec![],
            paired: vec![],
        };
        let report = Report {
            machine: Machine {
                cpu: "c".into(),
                cores: 2,
                kernel: "k".into(),
                load_before: 0.0,
            },
            command: "x".into(),
            date_utc: "2026-11-21 15:00".into(),
            rounds: 3,
            seconds_per_test: 1.0,
            paths: vec![
                path("direct", PathKind::Baseline, 10.0),
                path("lb-proxy", PathKind::Ours, 8.0),
                path("nginx", PathKind::Peer, 5.0),
            ],
            churn: vec![],
            notes: vec![],
        };
        let svg = ratios_svg(&report).expect("chart renders");
        assert!(
            svg.starts_with("<svg"),
            "an SVG document: {}",
            &svg[..40.min(svg.len())]
        );
        assert!(
            svg.contains("lb-proxy") && svg.contains("nginx"),
            "legend names paths"
        );
        assert!(
            svg.contains("bulk 1 flow"),
            "groups are labelled with their figure"
        );
    }
}
