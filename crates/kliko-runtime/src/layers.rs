//! Reading a small file straight out of an image's unpacked layers, when the daemon keeps
//! them in overlay folders this process may read (Docker as root with `overlay2` or
//! `fuse-overlayfs`, rootless Podman in the user's own storage).
//!
//! This is only a shortcut for [`crate::Docker::read_file`]: creating a container just to copy
//! `/kliko.yml` out of it mounts the image's root filesystem and costs a few hundred
//! milliseconds on a first run. The lookup here answers only when the merged view is
//! certain: the path is found as a regular file in the topmost layer that mentions it, no
//! layer above hides it (whiteouts in both the character-device and the `.wh.` form), and no
//! folder on the way is opaque, redirected or otherwise marked by overlayfs. In every other
//! case (a symlink, a whiteout, a permission error, an unknown driver) it answers `None` and
//! the caller takes the container path, which gives the canonical answer and error.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Storage drivers whose `GraphDriver` data names overlay folders (`UpperDir`, `LowerDir`).
const OVERLAY_DRIVERS: &[&str] = &["overlay2", "overlay", "fuse-overlayfs"];

/// Files bigger than this are left to the container path (kliko.yml files are small).
const MAX_BYTES: u64 = 4 << 20;

/// The image's layer folders, topmost first, from its `GraphDriver` data; `None` for a
/// driver that does not keep overlay folders or data that names none.
pub(crate) fn layer_dirs(driver: &str, data: &HashMap<String, String>) -> Option<Vec<PathBuf>> {
    if !OVERLAY_DRIVERS.contains(&driver) {
        return None;
    }
    let mut dirs = Vec::new();
    if let Some(upper) = data.get("UpperDir").filter(|s| !s.is_empty()) {
        dirs.push(PathBuf::from(upper));
    }
    if let Some(lower) = data.get("LowerDir") {
        dirs.extend(lower.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    (!dirs.is_empty() && dirs.iter().all(|d| d.is_absolute())).then_some(dirs)
}

/// The bytes of `path` (absolute, in the image) as the merged view of `layers` shows them,
/// when that is certain; `None` when the caller must ask the runtime instead.
pub(crate) fn read(layers: &[PathBuf], path: &str) -> Option<Vec<u8>> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    let (name, parents) = parts.split_last()?;
    for layer in layers {
        // Each layer must be a folder we can read; anything else and we know nothing.
        let mut dir = layer.clone();
        if !plain_dir(&dir) {
            return None;
        }
        let mut mentioned = true;
        for part in parents {
            match lookup(&dir, part)? {
                Found::Nothing => {
                    mentioned = false;
                    break;
                }
                Found::Dir(d) => dir = d,
                Found::File(_) => return None,
            }
        }
        if !mentioned {
            continue;
        }
        match lookup(&dir, name)? {
            Found::Nothing => continue,
            Found::Dir(_) => return None,
            Found::File(f) => {
                let meta = fs::symlink_metadata(&f).ok()?;
                if meta.len() > MAX_BYTES {
                    return None;
                }
                return fs::read(&f).ok();
            }
        }
    }
    // Not in any layer: let the runtime say so in its own words.
    None
}

enum Found {
    Nothing,
    Dir(PathBuf),
    File(PathBuf),
}

/// One name in one layer's folder: absent, a plain folder, a plain regular file; `None` for
/// anything that needs overlayfs's own rules (a whiteout, a symlink, a marked entry) or that
/// cannot be read.
fn lookup(dir: &Path, name: &str) -> Option<Found> {
    let wh = dir.join(format!(".wh.{name}"));
    match fs::symlink_metadata(&wh) {
        Ok(_) => return None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return None,
    }
    let p = dir.join(name);
    let meta = match fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(Found::Nothing),
        Err(_) => return None,
    };
    let ft = meta.file_type();
    if ft.is_char_device() || has_overlay_xattr(&p)? {
        return None;
    }
    if ft.is_dir() {
        return plain_dir(&p).then_some(Found::Dir(p));
    }
    ft.is_file().then_some(Found::File(p))
}

/// A folder that overlayfs merges as is: no opaque marker in either form, no overlay xattr.
fn plain_dir(dir: &Path) -> bool {
    match fs::symlink_metadata(dir.join(".wh..wh..opq")) {
        Ok(_) => return false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return false,
    }
    fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) && has_overlay_xattr(dir) == Some(false)
}

/// Whether `path` carries any overlayfs attribute (`trusted.overlay.*`, `user.overlay.*`:
/// opaque, redirect, metacopy, whiteout); `None` when the attributes cannot be listed.
fn has_overlay_xattr(path: &Path) -> Option<bool> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `c` is a NUL-terminated path and `buf` is writable for `buf.len()` bytes.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            break;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            // A filesystem without extended attributes has none of overlayfs's either.
            Some(libc::ENOTSUP) => return Some(false),
            _ => return None,
        }
    }
    Some(buf.split(|b| *b == 0).any(|n| n.windows(8).any(|w| w == b"overlay.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(root: &Path, name: &str) -> PathBuf {
        let d = root.join(name);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_topmost_layer_that_has_the_file_wins() {
        let t = tempfile::tempdir().unwrap();
        let (top, bottom) = (layer(t.path(), "top"), layer(t.path(), "bottom"));
        fs::write(bottom.join("kliko.yml"), "old").unwrap();
        assert_eq!(read(&[top.clone(), bottom.clone()], "/kliko.yml").as_deref(), Some(&b"old"[..]));
        fs::write(top.join("kliko.yml"), "new").unwrap();
        assert_eq!(read(&[top, bottom], "/kliko.yml").as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn nested_paths_go_through_plain_folders_of_several_layers() {
        let t = tempfile::tempdir().unwrap();
        let (top, bottom) = (layer(t.path(), "top"), layer(t.path(), "bottom"));
        fs::create_dir_all(top.join("etc/kliko")).unwrap();
        fs::create_dir_all(bottom.join("etc/kliko")).unwrap();
        fs::write(bottom.join("etc/kliko/a.yml"), "a").unwrap();
        assert_eq!(read(&[top, bottom], "etc//kliko/./a.yml").as_deref(), Some(&b"a"[..]));
    }

    #[test]
    fn whiteouts_opaque_folders_and_links_leave_it_to_the_runtime() {
        let t = tempfile::tempdir().unwrap();
        let (top, bottom) = (layer(t.path(), "top"), layer(t.path(), "bottom"));
        fs::write(bottom.join("kliko.yml"), "deleted above").unwrap();
        fs::write(top.join(".wh.kliko.yml"), "").unwrap();
        assert_eq!(read(&[top.clone(), bottom.clone()], "/kliko.yml"), None);
        fs::remove_file(top.join(".wh.kliko.yml")).unwrap();

        // An opaque folder above hides what the folder held below.
        fs::create_dir_all(top.join("etc")).unwrap();
        fs::create_dir_all(bottom.join("etc")).unwrap();
        fs::write(bottom.join("etc/k.yml"), "hidden").unwrap();
        fs::write(top.join("etc/.wh..wh..opq"), "").unwrap();
        assert_eq!(read(&[top.clone(), bottom.clone()], "/etc/k.yml"), None);

        std::os::unix::fs::symlink("etc/k.yml", top.join("link.yml")).unwrap();
        assert_eq!(read(&[top.clone(), bottom.clone()], "/link.yml"), None);
        // Absent everywhere, a folder, `..`, the root: the runtime answers.
        assert_eq!(read(&[top.clone(), bottom.clone()], "/nothing.yml"), None);
        assert_eq!(read(&[top.clone(), bottom.clone()], "/etc"), None);
        assert_eq!(read(&[top.clone(), bottom.clone()], "/etc/../kliko.yml"), None);
        assert_eq!(read(&[top, bottom.clone()], "/"), None);
        // A layer folder that is gone (the image was removed meanwhile).
        assert_eq!(read(&[t.path().join("gone"), bottom], "/kliko.yml"), None);
    }

    #[test]
    fn a_character_device_whiteout_hides_the_file() {
        let t = tempfile::tempdir().unwrap();
        let (top, bottom) = (layer(t.path(), "top"), layer(t.path(), "bottom"));
        fs::write(bottom.join("kliko.yml"), "deleted above").unwrap();
        let c = CString::new(top.join("kliko.yml").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; creating a 0/0 character device needs CAP_MKNOD.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) } != 0 {
            eprintln!("skipped: cannot make a whiteout device here (not root)");
            return;
        }
        assert_eq!(read(&[top, bottom], "/kliko.yml"), None);
    }

    #[test]
    fn only_overlay_drivers_name_layer_folders() {
        let data = HashMap::from([
            ("UpperDir".to_string(), "/d/top/diff".to_string()),
            ("LowerDir".to_string(), "/d/a/diff:/d/b/diff".to_string()),
        ]);
        assert_eq!(
            layer_dirs("overlay2", &data).unwrap(),
            vec![PathBuf::from("/d/top/diff"), PathBuf::from("/d/a/diff"), PathBuf::from("/d/b/diff")]
        );
        assert_eq!(layer_dirs("btrfs", &data), None);
        assert_eq!(layer_dirs("overlay2", &HashMap::new()), None);
        let relative = HashMap::from([("UpperDir".to_string(), "diff".to_string())]);
        assert_eq!(layer_dirs("fuse-overlayfs", &relative), None);
    }
}
