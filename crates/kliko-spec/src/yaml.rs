//! A YAML tree that remembers where every node came from.
//!
//! serde_yaml's `Value` carries no positions, so a semantic error (a duplicate field
//! name, an `initial` of the wrong type) could not say where it is. This builds a small
//! tree from yaml-rust2's marked events instead. Scalars keep their source text: the
//! validator decides what a scalar means from the declared type, which is both more
//! faithful to what the author wrote and independent of YAML 1.1 versus 1.2 resolution.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, Parser};
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

/// Documents longer than this are refused before parsing: a kliko.yml or a pipeline file
/// is a few KB.
pub const MAX_BYTES: usize = 512 * 1024;

/// Lists and mappings nested deeper than this are refused (a kliko.yml needs 6 levels).
/// Every walk over the tree recurses, so this is what keeps them off the end of the stack.
pub const MAX_DEPTH: usize = 64;

/// The most nodes a document may have once its aliases are expanded, counting the copies
/// kept for anchors. Each alias is a copy of its anchor, so a few lines of nested aliases
/// ("billion laughs") would otherwise expand to gigabytes.
pub const MAX_NODES: usize = 250_000;

/// The most scalar text, in bytes, a document may have once its aliases are expanded.
pub const MAX_TEXT: usize = 8 * 1024 * 1024;

/// Why a document was not turned into a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not valid YAML, or more than one document.
    Syntax,
    /// Valid as far as it was read, but over one of the limits above.
    Limit,
}

/// A YAML syntax error or a refused document: where and what.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Option<Pos>,
    pub message: String,
    pub kind: ErrorKind,
}

impl SyntaxError {
    fn syntax(pos: Pos, message: impl Into<String>) -> SyntaxError {
        SyntaxError { pos: Some(pos), message: message.into(), kind: ErrorKind::Syntax }
    }

    fn limit(pos: Option<Pos>, message: String) -> SyntaxError {
        SyntaxError { pos, message, kind: ErrorKind::Limit }
    }

    /// A document of `bytes` bytes (`None`: more than [`MAX_BYTES`], exact size unknown).
    pub fn too_large(bytes: Option<u64>) -> SyntaxError {
        let size = match bytes {
            Some(b) => human_bytes(b),
            None => format!("more than {}", human_bytes(MAX_BYTES as u64)),
        };
        SyntaxError::limit(
            None,
            format!("the document is too large: {size}, at most {}", human_bytes(MAX_BYTES as u64)),
        )
    }

    /// The message as a user reads it: syntax errors say "invalid YAML".
    pub fn describe(&self) -> String {
        match self.kind {
            ErrorKind::Syntax => format!("invalid YAML: {}", self.message),
            ErrorKind::Limit => self.message.clone(),
        }
    }
}

/// `512 KiB`, `3.0 MiB`, `100 bytes`.
fn human_bytes(b: u64) -> String {
    const KIB: u64 = 1024;
    if b < KIB {
        format!("{b} bytes")
    } else if b < KIB * KIB {
        if b.is_multiple_of(KIB) {
            format!("{} KiB", b / KIB)
        } else {
            format!("{:.1} KiB", b as f64 / KIB as f64)
        }
    } else {
        format!("{:.1} MiB", b as f64 / (KIB * KIB) as f64)
    }
}

/// Why [`read_file`] returned no text.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// Longer than [`MAX_BYTES`]: not read.
    TooLarge(SyntaxError),
}

/// Reads a YAML file for [`parse`], refusing one longer than [`MAX_BYTES`] without reading
/// it whole (a named pipe or `/dev/zero` stops after the limit too).
pub fn read_file(path: &std::path::Path) -> Result<String, ReadError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if meta.is_file() && meta.len() > MAX_BYTES as u64 {
        return Err(ReadError::TooLarge(SyntaxError::too_large(Some(meta.len()))));
    }
    let mut bytes = Vec::new();
    file.take(MAX_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(ReadError::Io)?;
    if bytes.len() > MAX_BYTES {
        return Err(ReadError::TooLarge(SyntaxError::too_large(None)));
    }
    String::from_utf8(bytes)
        .map_err(|e| ReadError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error())))
}

/// Parses one YAML document. `Ok(None)` for an empty stream.
///
/// Refuses a document longer than [`MAX_BYTES`], nested deeper than [`MAX_DEPTH`], or
/// larger than [`MAX_NODES`] / [`MAX_TEXT`] once aliases are expanded. yaml-rust2's own
/// `Parser::load` recurses once per nesting level, so the events are pulled one at a
/// time here instead and parsing stops at the first level too deep.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    if text.len() > MAX_BYTES {
        return Err(SyntaxError::too_large(Some(text.len() as u64)));
    }
    let mut b =
        Builder { parser: Parser::new_from_str(text), anchors: HashMap::new(), nodes: 0, text: 0, kept: (0, 0) };
    let mut root = None;
    loop {
        let (ev, mark) = b.next_event()?;
        match ev {
            Event::DocumentStart if root.is_some() => {
                return Err(SyntaxError::syntax(
                    Pos::from_marker(mark),
                    "expected a single YAML document, found a second one",
                ));
            }
            Event::DocumentStart => {
                let (ev, mark) = b.next_event()?;
                if matches!(ev, Event::DocumentEnd | Event::StreamEnd) {
                    continue;
                }
                root = Some(b.node(ev, mark, 0)?.node);
            }
            Event::StreamEnd => break,
            _ => {}
        }
    }
    Ok(root)
}

/// A node and what building it cost, so an alias to it can be charged the same.
#[derive(Clone)]
struct Built {
    node: Node,
    /// Nodes in the subtree, this one included.
    nodes: usize,
    /// Bytes of scalar text in the subtree.
    text: usize,
    /// Levels of lists and mappings in the subtree: 0 for a scalar.
    height: usize,
}

struct Builder<'a> {
    parser: Parser<std::str::Chars<'a>>,
    anchors: HashMap<usize, Built>,
    /// Nodes made so far, alias copies and anchor copies included.
    nodes: usize,
    /// Scalar bytes made so far, likewise.
    text: usize,
    /// The part of `nodes` and `text` that is copies kept for anchors: an alias copies a
    /// node, not the anchor copies inside it.
    kept: (usize, usize),
}

impl Builder<'_> {
    fn next_event(&mut self) -> Result<(Event, Marker), SyntaxError> {
        self.parser.next_token().map_err(|e| {
            let pos = Pos::from_marker(*e.marker());
            // The scanner looks ahead through flow collections and gives up at 256 levels,
            // before the builder sees the 65th: the same limit, in the same words.
            if e.info() == "recursion limit exceeded" {
                Self::too_deep(pos)
            } else {
                SyntaxError::syntax(pos, e.info())
            }
        })
    }

    fn charge(&mut self, nodes: usize, text: usize, pos: Pos) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(nodes);
        self.text = self.text.saturating_add(text);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError::limit(
                Some(pos),
                format!("the document is too large once its aliases are expanded: more than {MAX_NODES} values"),
            ));
        }
        if self.text > MAX_TEXT {
            return Err(SyntaxError::limit(
                Some(pos),
                format!(
                    "the document is too large once its aliases are expanded: more than {} of text",
                    human_bytes(MAX_TEXT as u64)
                ),
            ));
        }
        Ok(())
    }

    fn too_deep(pos: Pos) -> SyntaxError {
        SyntaxError::limit(Some(pos), format!("lists and mappings are nested too deeply: more than {MAX_DEPTH} levels"))
    }

    /// Builds the node that starts with `ev`, under `level` lists and mappings.
    fn node(&mut self, ev: Event, mark: Marker, level: usize) -> Result<Built, SyntaxError> {
        let pos = Pos::from_marker(mark);
        let before = (self.nodes - self.kept.0, self.text - self.kept.1);
        let (node, height, anchor) = match ev {
            Event::Scalar(text, style, anchor, tag) => {
                self.charge(1, text.len(), pos)?;
                let tagged_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let plain = style == TScalarStyle::Plain && !tagged_str;
                (Node::Scalar { text, plain, pos }, 0, anchor)
            }
            Event::Alias(id) => {
                let Some(target) = self.anchors.get(&id) else {
                    return Err(SyntaxError::syntax(pos, "alias to an unknown anchor"));
                };
                if level + target.height > MAX_DEPTH {
                    return Err(Self::too_deep(pos));
                }
                let (nodes, text) = (target.nodes, target.text);
                // Charged before the copy is made.
                self.charge(nodes, text, pos)?;
                return Ok(self.anchors[&id].clone());
            }
            Event::SequenceStart(anchor, _) => {
                if level >= MAX_DEPTH {
                    return Err(Self::too_deep(pos));
                }
                self.charge(1, 0, pos)?;
                let mut items = Vec::new();
                let mut height = 1;
                loop {
                    let (ev, mark) = self.next(pos)?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    let item = self.node(ev, mark, level + 1)?;
                    height = height.max(item.height + 1);
                    items.push(item.node);
                }
                (Node::Seq { items, pos }, height, anchor)
            }
            Event::MappingStart(anchor, _) => {
                if level >= MAX_DEPTH {
                    return Err(Self::too_deep(pos));
                }
                self.charge(1, 0, pos)?;
                let mut entries: Vec<(Node, Node)> = Vec::new();
                let mut height = 1;
                loop {
                    let (ev, mark) = self.next(pos)?;
                    if ev == Event::MappingEnd {
                        break;
                    }
                    let key = self.node(ev, mark, level + 1)?;
                    let (ev, mark) = self.next(pos)?;
                    let value = self.node(ev, mark, level + 1)?;
                    height = height.max(key.height + 1).max(value.height + 1);
                    entries.push((key.node, value.node));
                }
                // A block mapping's start marker points past its first key; the first
                // key is where a reader looks.
                let pos = entries.first().map_or(pos, |(k, _)| k.pos());
                (Node::Map { entries, pos }, height, anchor)
            }
            other => return Err(SyntaxError::syntax(pos, format!("unexpected YAML event {other:?}"))),
        };
        let nodes = self.nodes - self.kept.0 - before.0;
        let text = self.text - self.kept.1 - before.1;
        let built = Built { node, nodes, text, height };
        if anchor != 0 {
            // The copy kept for aliases costs as much as the node itself.
            self.charge(nodes, text, pos)?;
            self.kept = (self.kept.0 + nodes, self.kept.1 + text);
            self.anchors.insert(anchor, built.clone());
        }
        Ok(built)
    }

    fn next(&mut self, pos: Pos) -> Result<(Event, Marker), SyntaxError> {
        match self.next_event()? {
            (Event::StreamEnd, _) => Err(SyntaxError::syntax(pos, "unexpected end of the YAML document")),
            ev => Ok(ev),
        }
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

#[cfg(test)]
mod limit_tests {
    use super::*;

    /// The classic "billion laughs": nine levels of ten aliases each, 10^9 scalars expanded.
    pub(crate) fn alias_bomb() -> String {
        let mut s = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let p = format!("*a{}", i - 1);
            s.push_str(&format!("a{i}: &a{i} [{}]\n", vec![p; 10].join(", ")));
        }
        s
    }

    /// Runs `f` on a thread with a small stack: a recursion per nesting level would overflow it.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new().stack_size(256 * 1024).spawn(f).unwrap().join().unwrap()
    }

    #[test]
    fn an_alias_bomb_is_refused_where_it_explodes() {
        let e = parse(&alias_bomb()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Limit);
        assert!(e.describe().contains("too large once its aliases are expanded"), "{}", e.describe());
        // a5 is the first level with more than 250,000 values (10^6 with its copies).
        let line = e.pos.unwrap().line;
        assert!((5..=7).contains(&line), "line {line}");
    }

    #[test]
    fn aliases_of_a_long_scalar_are_charged_their_text() {
        let long = "x".repeat(100_000);
        let mut s = format!("a: &a {long}\nb: [");
        s.push_str(&vec!["*a"; 100].join(", "));
        s.push_str("]\n");
        let e = parse(&s).unwrap_err();
        assert!(e.describe().contains("8.0 MiB of text"), "{}", e.describe());
        assert_eq!(e.pos.unwrap().line, 2);
    }

    #[test]
    fn modest_aliases_and_nested_anchors_are_fine() {
        let mut s = String::from("base: &b {x: 1, y: &inner [1, 2, 3]}\n");
        for i in 0..100 {
            s.push_str(&format!("k{i}: [*b, *inner]\n"));
        }
        let Node::Map { entries, .. } = parse(&s).unwrap().unwrap() else { panic!() };
        assert_eq!(entries.len(), 101);
    }

    #[test]
    fn a_document_too_long_is_refused_before_parsing() {
        let text = format!("a: '{}'\n", "x".repeat(3 * 1024 * 1024));
        let e = parse(&text).unwrap_err();
        assert_eq!(e.describe(), "the document is too large: 3.0 MiB, at most 512 KiB");
        assert!(e.pos.is_none());
    }

    #[test]
    fn read_file_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.yml");
        std::fs::write(&big, vec![b'#'; MAX_BYTES + 1]).unwrap();
        match read_file(&big) {
            Err(ReadError::TooLarge(e)) => {
                assert_eq!(e.describe(), "the document is too large: 512.0 KiB, at most 512 KiB")
            }
            other => panic!("{other:?}"),
        }
        let ok = dir.path().join("ok.yml");
        std::fs::write(&ok, "a: 1\n").unwrap();
        assert_eq!(read_file(&ok).unwrap(), "a: 1\n");
        // Not a regular file: the size is unknown until read, and reading stops at the limit.
        match read_file(std::path::Path::new("/dev/zero")) {
            Err(ReadError::TooLarge(e)) => assert!(e.describe().contains("more than 512 KiB"), "{}", e.describe()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deep_flow_nesting_is_refused_without_overflowing_the_stack() {
        let text = format!("a: {}{}\n", "[".repeat(5000), "]".repeat(5000));
        let e = on_small_stack(move || parse(&text).unwrap_err());
        assert!(e.describe().contains("nested too deeply: more than 64 levels"), "{}", e.describe());
        assert_eq!(e.pos.unwrap().line, 1);
    }

    #[test]
    fn deep_block_nesting_is_refused_without_overflowing_the_stack() {
        // 300 nested block sequences, one per line, each indented one more (deeper would
        // pass the size limit first).
        let mut text = String::from("top:\n");
        for i in 0..300 {
            text.push_str(&" ".repeat(i + 1));
            text.push_str("-\n");
        }
        let e = on_small_stack(move || parse(&text).unwrap_err());
        assert!(e.describe().contains("nested too deeply"), "{}", e.describe());
        // The root mapping is level 1, `top`'s list level 2, so line 65 opens level 65.
        assert_eq!(e.pos.unwrap().line, 65);
    }

    #[test]
    fn exactly_the_limit_is_allowed() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        let root = on_small_stack(move || parse(&ok).map(|n| n.is_some()).map_err(|e| e.describe()));
        assert_eq!(root, Ok(true));
        let over = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(parse(&over).unwrap_err().describe().contains("nested too deeply"));
    }

    #[test]
    fn an_alias_cannot_nest_past_the_limit() {
        // Each part is 40 levels deep; the alias puts one inside the other: 80.
        let deep = format!("{}x{}", "[".repeat(40), "]".repeat(40));
        let text = format!("a: &d {deep}\nb: {}*d{}\n", "[".repeat(40), "]".repeat(40));
        let e = parse(&text).unwrap_err();
        assert!(e.describe().contains("nested too deeply"), "{}", e.describe());
        assert_eq!(e.pos.unwrap().line, 2);
    }
}
