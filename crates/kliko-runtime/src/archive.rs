//! Reading the tar archives the Engine's archive API returns, and the path
//! arithmetic for following symlinks inside an image. Pure and synchronous.

use std::io::{self, Read};

/// The first (for a file: the only) entry of an archive.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    File(Vec<u8>),
    /// The link's target, exactly as stored (absolute or relative).
    Symlink(String),
    /// Anything else, named for the error message.
    Other(&'static str),
}

pub(crate) fn first_entry(tar: &[u8]) -> io::Result<Entry> {
    let mut archive = tar::Archive::new(tar);
    let mut entries = archive.entries()?;
    let mut entry = entries.next().ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "empty archive"))??;
    let kind = entry.header().entry_type();
    Ok(match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let mut bytes = Vec::with_capacity(entry.size().try_into().unwrap_or(0));
            entry.read_to_end(&mut bytes)?;
            Entry::File(bytes)
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name()?
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "symlink entry without a target"))?;
            Entry::Symlink(target.to_string_lossy().into_owned())
        }
        tar::EntryType::Directory => Entry::Other("directory"),
        tar::EntryType::Link => Entry::Other("hard link"),
        tar::EntryType::Char => Entry::Other("character device"),
        tar::EntryType::Block => Entry::Other("block device"),
        tar::EntryType::Fifo => Entry::Other("fifo"),
        _ => Entry::Other("special file"),
    })
}

/// Resolve `path` against the directory `base` (both inside the image) to a
/// clean absolute path: `.` and `..` folded, `..` stopping at the root as the
/// kernel does, so a symlink can never point outside the image's filesystem.
pub(crate) fn normalize(base: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let joined = if path.starts_with('/') { path.to_string() } else { format!("{base}/{path}") };
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The directory holding `path` (an absolute, normalized path).
pub(crate) fn parent(path: &str) -> String {
    match path.rfind('/') {
        Some(0) | None => "/".to_string(),
        Some(i) => path[..i].to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_folds_dots_and_stays_inside_root() {
        assert_eq!(normalize("/", "kliko.yml"), "/kliko.yml");
        assert_eq!(normalize("/", "/a/./b//c/"), "/a/b/c");
        assert_eq!(normalize("/etc/conf", "../x"), "/etc/x");
        assert_eq!(normalize("/etc", "../../../x"), "/x");
        assert_eq!(normalize("/etc", "/opt/y"), "/opt/y");
        assert_eq!(normalize("/", ""), "/");
    }

    #[test]
    fn parent_of_paths() {
        assert_eq!(parent("/kliko.yml"), "/");
        assert_eq!(parent("/a/b/c"), "/a/b");
    }

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().unwrap()
    }

    #[test]
    fn reads_regular_file_and_symlink_entries() {
        let tar = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(5);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, "kliko.yml", &b"io: x"[..]).unwrap();
        });
        assert_eq!(first_entry(&tar).unwrap(), Entry::File(b"io: x".to_vec()));

        let tar = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "kliko.yml", "etc/real.yml").unwrap();
        });
        assert_eq!(first_entry(&tar).unwrap(), Entry::Symlink("etc/real.yml".into()));

        let tar = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_cksum();
            b.append_data(&mut h, "dir/", io::empty()).unwrap();
        });
        assert_eq!(first_entry(&tar).unwrap(), Entry::Other("directory"));
        assert!(first_entry(&[]).is_err());
    }
}
