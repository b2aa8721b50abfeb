//! Directed acyclic graphs drawn as SVG, without Graphviz: the web's lineage (runs and data)
//! and pipeline (steps) pictures. Nodes go in layers left to right, each one layer after
//! everything it comes from; edges are curves from the right side of a node to the left side
//! of the next. Every string is escaped here.

use std::collections::BTreeMap;

/// One box.
#[derive(Clone, Debug, Default)]
pub struct Node {
    /// Where the box links to (none: not a link).
    pub href: Option<String>,
    /// The tooltip.
    pub title: String,
    /// The text, one line each (the first in bold); long lines are shortened.
    pub lines: Vec<String>,
    /// Rounded ends (data) rather than slightly rounded corners (a run, a step).
    pub round: bool,
    /// Outlined: the object the page is about.
    pub outlined: bool,
    /// An `id` for the box's group, so a script can find it.
    pub id: Option<String>,
    /// A CSS class for the box's group (`st-running`: a stylesheet colours it).
    pub class: Option<String>,
}

/// The picture of `nodes` with `edges` (pairs of indices into `nodes`, from → to).
/// `class` goes on the `<svg>` element, `label` is its accessible name.
pub fn layered(nodes: &[Node], edges: &[(usize, usize)], class: &str, label: &str) -> String {
    let mut edges: Vec<(usize, usize)> =
        edges.iter().copied().filter(|&(a, b)| a < nodes.len() && b < nodes.len()).collect();
    edges.sort();
    edges.dedup();
    // Layers: the longest path from a source; bounded passes, so a cycle (never given) cannot
    // loop forever.
    let mut layer = vec![0usize; nodes.len()];
    for _ in 0..nodes.len() {
        let mut changed = false;
        for &(a, b) in &edges {
            if layer[b] < layer[a] + 1 {
                layer[b] = layer[a] + 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let (w, h, gap_x, gap_y, pad) = (170.0, 46.0, 60.0, 18.0, 10.0);
    let mut row_of = vec![0usize; nodes.len()];
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, l) in layer.iter().enumerate() {
        let r = rows.entry(*l).or_default();
        row_of[i] = *r;
        *r += 1;
    }
    let pos = |i: usize| (pad + layer[i] as f64 * (w + gap_x), pad + row_of[i] as f64 * (h + gap_y));
    let width = pad * 2.0 + (rows.len().max(1) as f64) * (w + gap_x) - gap_x;
    let height = pad * 2.0 + (rows.values().copied().max().unwrap_or(1) as f64) * (h + gap_y) - gap_y;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"{}\" role=\"img\" aria-label=\"{}\" \
         width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"11\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\">\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#667\"/></marker></defs>",
        esc(class),
        esc(label)
    );
    for &(a, b) in &edges {
        let ((ax, ay), (bx, by)) = (pos(a), pos(b));
        let (x1, y1, x2, y2) = (ax + w, ay + h / 2.0, bx, by + h / 2.0);
        let mid = (x1 + x2) / 2.0;
        s.push_str(&format!(
            "<path d=\"M{x1:.1},{y1:.1} C{mid:.1},{y1:.1} {mid:.1},{y2:.1} {x2:.1},{y2:.1}\" fill=\"none\" stroke=\"#667\" stroke-width=\"1.3\" marker-end=\"url(#arrow)\"/>"
        ));
    }
    for (i, n) in nodes.iter().enumerate() {
        let (x, y) = pos(i);
        let (fill, rx) = if n.round { ("#f3f6ee", 20) } else { ("#e8f0fe", 8) };
        let stroke = if n.outlined { "stroke=\"#c2410c\" stroke-width=\"2.5\"" } else { "stroke=\"#8a94a6\"" };
        let group = n.id.is_some() || n.class.is_some();
        if group {
            s.push_str("<g");
            if let Some(id) = &n.id {
                s.push_str(&format!(" id=\"{}\"", esc(id)));
            }
            if let Some(c) = &n.class {
                s.push_str(&format!(" class=\"{}\"", esc(c)));
            }
            s.push('>');
        }
        match &n.href {
            Some(href) => s.push_str(&format!("<a href=\"{}\">", esc(href))),
            None => s.push_str("<g>"),
        }
        s.push_str(&format!(
            "<title>{}</title><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w}\" height=\"{h}\" rx=\"{rx}\" fill=\"{fill}\" {stroke}/>",
            esc(&n.title)
        ));
        for (k, line) in n.lines.iter().enumerate() {
            let shown: String = if line.chars().count() > 26 {
                format!("{}…", line.chars().take(25).collect::<String>())
            } else {
                line.clone()
            };
            let weight = if k == 0 { " font-weight=\"bold\"" } else { "" };
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\"{weight}>{}</text>",
                x + w / 2.0,
                y + 18.0 + k as f64 * 15.0,
                esc(&shown)
            ));
        }
        s.push_str(if n.href.is_some() { "</a>" } else { "</g>" });
        if group {
            s.push_str("</g>");
        }
    }
    s.push_str("</svg>");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Node {
        Node { title: name.into(), lines: vec![name.into()], ..Default::default() }
    }

    #[test]
    fn nodes_go_one_layer_after_what_they_come_from_and_text_is_escaped() {
        let mut nodes = vec![node("a"), node("b<script>"), node("c")];
        nodes[2].href = Some("/x?a=1&b=\"2\"".into());
        nodes[1].id = Some("step-b".into());
        nodes[1].class = Some("st-running".into());
        // a → b → c and a → c: c is in the third layer, not the second.
        let svg = layered(&nodes, &[(0, 1), (1, 2), (0, 2), (0, 9)], "pipeline", "graph");
        assert!(svg.contains("b&lt;script&gt;") && !svg.contains("<script>"));
        assert!(svg.contains("<a href=\"/x?a=1&amp;b=&quot;2&quot;\">"));
        assert!(svg.contains("<g id=\"step-b\" class=\"st-running\">"));
        assert_eq!(svg.matches("marker-end=").count(), 3, "the edge to a missing node is dropped");
        let x_of = |name: &str| {
            let at = svg.find(&format!("<title>{name}</title><rect x=\"")).unwrap() + name.len() + 24;
            svg[at..].split('"').next().unwrap().parse::<f64>().unwrap()
        };
        assert!(x_of("a") < x_of("b&lt;script&gt;") && x_of("b&lt;script&gt;") < x_of("c"));
    }
}
