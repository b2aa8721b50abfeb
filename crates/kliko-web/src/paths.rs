//! Host folders a browser may name: only folders inside the configured data roots.
//!
//! A path typed in the form is resolved against the first root when relative, then its
//! deepest existing ancestor is canonicalized (which resolves every symlink and `..`)
//! and must lie inside a canonical root; what does not exist yet must be plain names.
//! So `../etc`, `/etc`, and a symlink inside a root that points out of it are refused.

use std::path::{Component, Path, PathBuf};

/// The canonical data roots.
#[derive(Clone, Debug)]
pub struct DataRoots {
    roots: Vec<PathBuf>,
}

impl DataRoots {
    /// Canonicalizes each root; a root that does not exist is an error.
    pub fn new(roots: &[PathBuf]) -> Result<DataRoots, (PathBuf, std::io::Error)> {
        let mut out = Vec::new();
        for r in roots {
            let c = std::fs::canonicalize(r).map_err(|e| (r.clone(), e))?;
            if !c.is_dir() {
                return Err((r.clone(), std::io::Error::other("not a folder")));
            }
            if !out.contains(&c) {
                out.push(c);
            }
        }
        Ok(DataRoots { roots: out })
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Resolve what a user typed to a path inside a root, or say why not.
    pub fn resolve(&self, typed: &str) -> Result<PathBuf, String> {
        let typed = typed.trim();
        let Some(first) = self.roots.first() else {
            return Err("this server has no data folder (start it with `--data-root DIR`)".into());
        };
        if typed.is_empty() {
            return Err("give a folder".into());
        }
        if typed.contains('\0') {
            return Err("not a valid path".into());
        }
        let p = Path::new(typed);
        let joined = if p.is_absolute() { p.to_path_buf() } else { first.join(p) };
        // Split into the deepest existing ancestor and the rest.
        let mut existing = joined.clone();
        let mut rest: Vec<std::ffi::OsString> = Vec::new();
        loop {
            if std::fs::symlink_metadata(&existing).is_ok() {
                break;
            }
            match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => return Err("not a valid path".into()),
            }
        }
        let canon = std::fs::canonicalize(&existing).map_err(|e| format!("cannot resolve it: {e}"))?;
        // The part that does not exist may not climb out with `..` (canonicalize did not see it).
        if rest
            .iter()
            .any(|c| matches!(Path::new(c).components().next(), Some(Component::ParentDir | Component::CurDir)))
        {
            return Err("a folder to be created may not contain `..`".into());
        }
        let mut full = canon;
        for c in rest.iter().rev() {
            full.push(c);
        }
        if !self.roots.iter().any(|r| full.starts_with(r)) {
            return Err("that folder is outside the data folders this server may use".into());
        }
        Ok(full)
    }

    /// Folders under the roots (not following symlinks, hidden ones skipped), for suggestions.
    pub fn folders(&self, max_depth: usize, max_count: usize) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for root in &self.roots {
            let mut stack = vec![(root.clone(), 0usize)];
            while let Some((dir, depth)) = stack.pop() {
                if out.len() >= max_count {
                    return out;
                }
                out.push(dir.clone());
                if depth >= max_depth {
                    continue;
                }
                let Ok(rd) = std::fs::read_dir(&dir) else { continue };
                let mut children: Vec<PathBuf> = rd
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| e.path())
                    .collect();
                children.sort();
                children.reverse();
                stack.extend(children.into_iter().map(|c| (c, depth + 1)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_paths_outside_the_roots() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("in")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        let roots = DataRoots::new(&[root.path().to_path_buf()]).unwrap();
        let canon = std::fs::canonicalize(root.path()).unwrap();
        assert_eq!(roots.resolve("in").unwrap(), canon.join("in"));
        assert_eq!(roots.resolve("in/new/deeper").unwrap(), canon.join("in/new/deeper"));
        assert_eq!(roots.resolve(canon.join("in").to_str().unwrap()).unwrap(), canon.join("in"));
        assert!(roots.resolve("../").is_err());
        assert!(roots.resolve("in/../../x").is_err());
        assert!(roots.resolve("/etc").is_err());
        assert!(roots.resolve("escape").is_err());
        assert!(roots.resolve("escape/new").is_err());
        assert!(roots.resolve("new/../../x").is_err());
        assert!(roots.resolve("").is_err());
    }
}
