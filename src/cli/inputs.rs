//! The CLI's image arguments: files, folders (walked recursively for image extensions) and
//! glob patterns (expanded here, so quoting them works the same on every shell), each expanded
//! in sorted order so a run is reproducible.

use std::path::{Component, Path, PathBuf};

/// Extensions a folder walk picks up, compared case-insensitively.
const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// An argument that named nothing readable: reported like an unreadable file.
#[derive(Debug, PartialEq)]
pub struct Unmatched {
    pub arg: String,
    pub reason: String,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_pattern(arg: &str) -> bool {
    arg.contains(['*', '?', '['])
}

/// Image files under `dir`, sorted by path.
fn walk(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && is_image(e.path()))
        .map(walkdir::DirEntry::into_path)
        .collect()
}

/// Files to run, in argument order. A file named outright is kept whatever its extension,
/// and also when missing, so that reading it reports the error in its place.
pub fn expand(args: &[String]) -> (Vec<PathBuf>, Vec<Unmatched>) {
    let mut files = Vec::new();
    let mut unmatched = Vec::new();
    for arg in args {
        let path = Path::new(arg);
        if path.is_dir() {
            files.extend(walk(path));
        } else if path.exists() || !is_pattern(arg) {
            files.push(path.to_owned());
        } else {
            match glob(arg) {
                Ok(found) if !found.is_empty() => files.extend(found),
                Ok(_) => unmatched.push(Unmatched {
                    arg: arg.clone(),
                    reason: "no file matches this pattern".into(),
                }),
                Err(reason) => unmatched.push(Unmatched {
                    arg: arg.clone(),
                    reason,
                }),
            }
        }
    }
    (files, unmatched)
}

/// Matches of a pattern, sorted; folders among them are walked.
fn glob(pattern: &str) -> Result<Vec<PathBuf>, String> {
    let mut matches: Vec<PathBuf> = glob::glob(pattern)
        .map_err(|e| format!("bad pattern: {e}"))?
        .filter_map(Result::ok)
        .collect();
    matches.sort();
    Ok(matches
        .into_iter()
        .flat_map(|p| if p.is_dir() { walk(&p) } else { vec![p] })
        .collect())
}

/// Where an input's annotated copy goes under `--render-dir`: its path as given, without the
/// root, `.` or `..`, so images from different folders never overwrite each other.
pub fn relative_name(path: &Path) -> PathBuf {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_walked_for_images_sorted_and_globs_expanded() {
        let dir = std::env::temp_dir().join(format!("detectd-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("b/c")).unwrap();
        for f in [
            "b/z.PNG",
            "b/a.jpg",
            "b/c/m.webp",
            "b/notes.txt",
            "top.Tiff",
        ] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let d = |s: &str| dir.join(s).display().to_string();
        let (files, unmatched) = expand(&[d("b"), d("*.Tiff"), d("none-*.png")]);
        let names: Vec<PathBuf> = files
            .iter()
            .map(|p| p.strip_prefix(&dir).unwrap().to_owned())
            .collect();
        let want: Vec<PathBuf> = ["b/a.jpg", "b/c/m.webp", "b/z.PNG", "top.Tiff"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(names, want);
        assert_eq!(unmatched.len(), 1);
        assert!(unmatched[0].arg.ends_with("none-*.png"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_plain_files_are_kept_to_be_reported() {
        let (files, unmatched) = expand(&["no/such.png".into()]);
        assert_eq!(files, vec![PathBuf::from("no/such.png")]);
        assert!(unmatched.is_empty());
    }

    #[test]
    fn relative_names_drop_roots_and_parents() {
        assert_eq!(
            relative_name(Path::new("/data/../x/./a.jpg")),
            PathBuf::from("data/x/a.jpg")
        );
        assert_eq!(relative_name(Path::new("a.png")), PathBuf::from("a.png"));
    }
}
