//! Turning a step's `input`/`foreach` into engine inputs: host folders are passed as paths
//! (the engine hashes them through the stat cache and mounts them), step outputs as stored
//! trees, and several inputs as a tree composed here with one subfolder per input.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kliko_core::tree::{Entry, Tree};
use kliko_core::Digest;
use kliko_engine::Input;
use kliko_store::{IngestMode, ObjectKind, Store};

use crate::file::{InputSpec, Item, Source, Step};
use crate::{PipelineError, Result};

/// Whether composed inputs go into the store (to run) or are only digested (to show keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    Store,
    DigestOnly,
}

/// One entry a `foreach` step iterates over.
#[derive(Clone, Debug)]
pub(crate) enum EntryRef {
    HostDir(PathBuf),
    HostFile(PathBuf),
    /// An entry of a stored tree (a step's output).
    Stored(Entry),
}

pub(crate) struct Resolver {
    pub store: Arc<Store>,
    pub stage: Stage,
    /// Trees composed in `DigestOnly` mode, which are not in the store.
    composed: Mutex<HashMap<Digest, Tree>>,
}

impl Resolver {
    pub fn new(store: Arc<Store>, stage: Stage) -> Resolver {
        Resolver { store, stage, composed: Mutex::default() }
    }

    pub fn get_tree(&self, d: &Digest) -> Result<Tree> {
        if let Some(t) = self.composed.lock().expect("composed lock").get(d) {
            return Ok(t.clone());
        }
        Ok(self.store.get_tree(d)?)
    }

    pub fn put_tree(&self, t: Tree) -> Result<Digest> {
        match self.stage {
            Stage::Store => Ok(self.store.put_bytes(ObjectKind::Tree, &t.encode())?),
            Stage::DigestOnly => {
                let d = t.digest();
                self.composed.lock().expect("composed lock").insert(d, t);
                Ok(d)
            }
        }
    }

    /// The entries of a `foreach` source, sorted by name; names starting with `.` are skipped.
    pub fn entries(&self, src: &Source, outputs: &HashMap<String, Digest>) -> Result<Vec<(String, EntryRef)>> {
        let mut out = Vec::new();
        match src {
            Source::Path(dir) => {
                let rd = fs::read_dir(dir).map_err(|source| PipelineError::Io { path: dir.clone(), source })?;
                for e in rd {
                    let e = e.map_err(|source| PipelineError::Io { path: dir.clone(), source })?;
                    let Some(name) = e.file_name().to_str().map(str::to_string) else {
                        return Err(PipelineError::EntryName {
                            name: e.file_name().to_string_lossy().into_owned(),
                            of: dir.display().to_string(),
                        });
                    };
                    if name.starts_with('.') {
                        continue;
                    }
                    let path = e.path();
                    // Follows a symlink: an entry is what it points at.
                    let m = fs::metadata(&path).map_err(|source| PipelineError::Io { path: path.clone(), source })?;
                    if m.is_dir() {
                        out.push((name, EntryRef::HostDir(path)));
                    } else if m.is_file() {
                        out.push((name, EntryRef::HostFile(path)));
                    }
                }
            }
            Source::Step(s) => {
                let tree = self.get_tree(&outputs[s])?;
                for (name, entry) in tree.entries {
                    let Ok(name) = String::from_utf8(name) else {
                        return Err(PipelineError::EntryName {
                            name: "?".into(),
                            of: format!("the output of step `{s}`"),
                        });
                    };
                    if name.starts_with('.') {
                        continue;
                    }
                    out.push((name, EntryRef::Stored(entry)));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The engine input of one run: `entry` is the current `foreach` entry, if any.
    pub fn run_input(
        &self,
        step: &Step,
        entry: Option<&(String, EntryRef)>,
        outputs: &HashMap<String, Digest>,
    ) -> Result<Input> {
        let each = || entry.expect("`each` is only accepted with `foreach`");
        Ok(match &step.input {
            None => Input::None,
            Some(InputSpec::One(Item::Step(s))) => Input::Tree(outputs[s]),
            Some(InputSpec::One(Item::Path(p))) => {
                if p.is_dir() {
                    Input::Path(p.clone())
                } else {
                    Input::Tree(self.file_tree(p)?)
                }
            }
            Some(InputSpec::One(Item::Each)) => match each() {
                (_, EntryRef::HostDir(p)) => Input::Path(p.clone()),
                (name, e) => Input::Tree(self.entry_tree(name, e)?),
            },
            Some(InputSpec::Gather(items)) => {
                let mut t = Tree::new();
                for n in items {
                    let e = match &n.item {
                        Item::Step(s) => Entry::Dir { digest: outputs[s] },
                        Item::Path(p) if p.is_dir() => Entry::Dir { digest: self.host_tree(p)? },
                        Item::Path(p) => self.host_file(p)?,
                        Item::Each => {
                            let (name, e) = each();
                            Entry::Dir { digest: self.entry_tree(name, e)? }
                        }
                    };
                    t.insert(n.name.clone().into_bytes(), e).expect("checked when parsed");
                }
                Input::Tree(self.put_tree(t)?)
            }
        })
    }

    /// A `foreach` step's output: one subfolder per entry.
    pub fn gather(&self, outputs: &[(String, Digest)]) -> Result<Digest> {
        let mut t = Tree::new();
        for (name, d) in outputs {
            t.insert(name.clone().into_bytes(), Entry::Dir { digest: *d }).expect("entry names are valid");
        }
        self.put_tree(t)
    }

    /// An entry as a folder: a folder's own tree, or a folder holding the file as `<name>`.
    fn entry_tree(&self, name: &str, e: &EntryRef) -> Result<Digest> {
        match e {
            EntryRef::HostDir(p) => self.host_tree(p),
            EntryRef::HostFile(p) => self.file_tree(p),
            EntryRef::Stored(Entry::Dir { digest }) => Ok(*digest),
            EntryRef::Stored(other) => {
                let mut t = Tree::new();
                t.insert(name.as_bytes().to_vec(), other.clone()).expect("entry names are valid");
                self.put_tree(t)
            }
        }
    }

    /// A folder holding only the host file `p`, under its own name.
    fn file_tree(&self, p: &Path) -> Result<Digest> {
        let name = p.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_else(|| b"input".to_vec());
        let mut t = Tree::new();
        t.insert(name, self.host_file(p)?).expect("a file name is a valid entry name");
        self.put_tree(t)
    }

    fn host_file(&self, p: &Path) -> Result<Entry> {
        let m = fs::metadata(p).map_err(|source| PipelineError::Io { path: p.to_path_buf(), source })?;
        let digest = match self.stage {
            Stage::Store => self.store.ingest(p, IngestMode::Copy)?.digest,
            Stage::DigestOnly => kliko_core::hash::hash_file_stable(p, &m).map_err(kliko_store::StoreError::from)?.0,
        };
        Ok(Entry::File { size: m.len(), executable: kliko_core::hash::is_executable(&m), digest })
    }

    /// A host folder's tree digest; in `Store` mode also its objects (copied in only if the
    /// store does not hold them all already, so an unchanged folder costs one stat walk).
    fn host_tree(&self, p: &Path) -> Result<Digest> {
        let d = self.store.hash_path(p, &kliko_core::hash::NoProgress)?.digest;
        if self.stage == Stage::DigestOnly || self.complete(&d) {
            return Ok(d);
        }
        Ok(self.store.ingest(p, IngestMode::Copy)?.digest)
    }

    fn complete(&self, tree: &Digest) -> bool {
        match self.store.walk_tree(tree) {
            Ok((_, files)) => files.iter().all(|(d, size)| self.store.has_blob(d, *size)),
            Err(_) => false,
        }
    }
}
