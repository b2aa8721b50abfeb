//! A YAML tree that remembers where every node came from.
//!
//! serde_yaml's `Value` carries no positions, so a semantic error (a duplicate field
//! name, an `initial` of the wrong type) could not say where it is. This builds a small
//! tree from yaml-rust2's marked events instead. Scalars keep their source text: the
//! validator decides what a scalar means from the declared type, which is both more
//! faithful to what the author wrote and independent of YAML 1.1 versus 1.2 resolution.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn from_marker(m: Marker) -> Pos {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Pos { line: m.line().max(1), column: m.col() + 1 }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

#[derive(Debug, Clone)]
pub enum Node {
    /// `plain` is false for quoted, block and `!!str`-tagged scalars: those are always
    /// strings, never null.
    Scalar {
        text: String,
        plain: bool,
        pos: Pos,
    },
    Seq {
        items: Vec<Node>,
        pos: Pos,
    },
    Map {
        entries: Vec<(Node, Node)>,
        pos: Pos,
    },
}

impl Node {
    pub fn pos(&self) -> Pos {
        match self {
            Node::Scalar { pos, .. } | Node::Seq { pos, .. } | Node::Map { pos, .. } => *pos,
        }
    }

    /// A plain `~`, `null` or empty scalar: YAML's null, which kliko.yml treats as absent.
    pub fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { text, plain: true, .. }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn as_scalar(&self) -> Option<&str> {
        match self {
            Node::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// What kind of node this is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Scalar { .. } if self.is_null() => "null",
            Node::Scalar { .. } => "a scalar",
            Node::Seq { .. } => "a list",
            Node::Map { .. } => "a mapping",
        }
    }
}

/// A YAML syntax error: where and what.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Option<Pos>,
    pub message: String,
}

struct Collector {
    events: Vec<(Event, Marker)>,
}

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        self.events.push((ev, mark));
    }
}

/// Parses one YAML document. `Ok(None)` for an empty stream.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut collector = Collector { events: Vec::new() };
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut collector, true)
        .map_err(|e| SyntaxError { pos: Some(Pos::from_marker(*e.marker())), message: e.info().to_string() })?;
    let mut builder = Builder { events: collector.events.into_iter(), anchors: HashMap::new() };
    let mut root = None;
    let mut documents = 0;
    while let Some((ev, mark)) = builder.events.next() {
        match ev {
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(SyntaxError {
                        pos: Some(Pos::from_marker(mark)),
                        message: "expected a single YAML document, found a second one".into(),
                    });
                }
                builder.anchors.clear();
                let Some((ev, mark)) = builder.events.next() else {
                    break;
                };
                root = Some(builder.node(ev, mark)?);
            }
            Event::StreamEnd => break,
            _ => {}
        }
    }
    Ok(root)
}

struct Builder {
    events: std::vec::IntoIter<(Event, Marker)>,
    anchors: HashMap<usize, Node>,
}

impl Builder {
    fn node(&mut self, ev: Event, mark: Marker) -> Result<Node, SyntaxError> {
        let pos = Pos::from_marker(mark);
        let (node, anchor) = match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let tagged_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let plain = style == TScalarStyle::Plain && !tagged_str;
                (Node::Scalar { text, plain, pos }, anchor)
            }
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| SyntaxError { pos: Some(pos), message: "alias to an unknown anchor".into() })?;
                return Ok(node);
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, mark) = self.next(pos)?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.node(ev, mark)?);
                }
                (Node::Seq { items, pos }, anchor)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries: Vec<(Node, Node)> = Vec::new();
                loop {
                    let (ev, mark) = self.next(pos)?;
                    if ev == Event::MappingEnd {
                        break;
                    }
                    let key = self.node(ev, mark)?;
                    let (ev, mark) = self.next(pos)?;
                    let value = self.node(ev, mark)?;
                    entries.push((key, value));
                }
                // A block mapping's start marker points past its first key; the first
                // key is where a reader looks.
                let pos = entries.first().map_or(pos, |(k, _)| k.pos());
                (Node::Map { entries, pos }, anchor)
            }
            other => return Err(SyntaxError { pos: Some(pos), message: format!("unexpected YAML event {other:?}") }),
        };
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }

    fn next(&mut self, pos: Pos) -> Result<(Event, Marker), SyntaxError> {
        self.events.next().ok_or(SyntaxError { pos: Some(pos), message: "unexpected end of the YAML document".into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let root = parse("a: 1\nb:\n  - x: 'q'\n").unwrap().unwrap();
        let Node::Map { entries, pos } = root else { panic!() };
        assert_eq!(pos, Pos { line: 1, column: 1 });
        assert_eq!(entries[1].0.pos(), Pos { line: 2, column: 1 });
        let Node::Seq { items, .. } = &entries[1].1 else { panic!() };
        let Node::Map { entries: inner, .. } = &items[0] else { panic!() };
        assert_eq!(inner[0].0.pos(), Pos { line: 3, column: 5 });
        assert!(matches!(&inner[0].1, Node::Scalar { text, plain: false, .. } if text == "q"));
    }

    #[test]
    fn aliases_resolve_and_nulls_are_recognised() {
        let root = parse("a: &x [1, 2]\nb: *x\nc:\nd: ~\ne: ''\n").unwrap().unwrap();
        let Node::Map { entries, .. } = root else { panic!() };
        assert!(matches!(&entries[1].1, Node::Seq { items, .. } if items.len() == 2));
        assert!(entries[2].1.is_null());
        assert!(entries[3].1.is_null());
        assert!(!entries[4].1.is_null());
    }

    #[test]
    fn syntax_errors_and_multiple_documents() {
        let e = parse("a: [1\nb: 2").unwrap_err();
        assert_eq!(e.pos.unwrap().line, 2);
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(e.message.contains("single YAML document"), "{}", e.message);
        assert!(parse("").unwrap().is_none());
        assert!(parse("# only a comment\n").unwrap().is_none());
    }
}
