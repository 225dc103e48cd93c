//! A user's history, newest first, and reading one of their files.

use std::fs;
use std::io;
use std::path::Path;

use jiff::Timestamp;
use serde::Serialize;

use super::names::{FileKind, parse_file_name, safe_user_dir};
use super::{Error, ImageMetadata, io_err};

/// Default and maximum page size of [`list_images`].
pub const DEFAULT_LIST_LIMIT: usize = 50;
pub const MAX_LIST_LIMIT: usize = 500;

/// One entry of a user's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedImage {
    pub file: String,
    /// `null` when the metadata file is missing or unreadable; the image is still listed.
    pub metadata: Option<ImageMetadata>,
    pub bytes: u64,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    pub images: Vec<ListedImage>,
    /// Pass as `before` to get the next page; `null` on the last page.
    pub next_before: Option<String>,
}

/// Lists a user's PNGs newest first (file names start with the UTC time, so name order is time
/// order), at most `limit`, only those whose name sorts before `before`.
pub fn list_images(
    root: &Path,
    user: &str,
    limit: usize,
    before: Option<&str>,
) -> Result<Listing, Error> {
    if let Some(before) = before
        && parse_file_name(before).is_none()
    {
        return Err(Error::InvalidFileName);
    }
    let dir = root.join(safe_user_dir(user)?);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        // A user who never generated anything simply has an empty history.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Listing {
                images: Vec::new(),
                next_before: None,
            });
        }
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if parse_file_name(&name) == Some(FileKind::Png) && before.is_none_or(|b| name.as_str() < b)
        {
            names.push(name);
        }
    }
    names.sort_unstable_by(|a, b| b.cmp(a));
    let limit = limit.clamp(1, MAX_LIST_LIMIT);
    let next_before = (names.len() > limit).then(|| names[limit - 1].clone());
    names.truncate(limit);

    let mut images = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let stat = match fs::symlink_metadata(&path) {
            Ok(stat) if stat.is_file() => stat,
            // Deleted since read_dir, or not a plain file: not part of the history.
            _ => continue,
        };
        let metadata = read_metadata(&dir, &name);
        let created_at = match &metadata {
            Some(m) => m.created_at,
            None => stat
                .modified()
                .ok()
                .and_then(|t| Timestamp::try_from(t).ok())
                .unwrap_or(Timestamp::UNIX_EPOCH),
        };
        images.push(ListedImage {
            file: name,
            metadata,
            bytes: stat.len(),
            created_at,
        });
    }
    Ok(Listing {
        images,
        next_before,
    })
}

fn read_metadata(dir: &Path, png_name: &str) -> Option<ImageMetadata> {
    let json_name = format!("{}.json", png_name.strip_suffix(".png")?);
    let bytes = fs::read(dir.join(json_name)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Reads one of a user's files (PNG or metadata) by its plain name.
pub fn read_output(root: &Path, user: &str, file: &str) -> Result<(Vec<u8>, FileKind), Error> {
    let kind = parse_file_name(file).ok_or(Error::InvalidFileName)?;
    let path = root.join(safe_user_dir(user)?).join(file);
    // Only plain files: a symlink planted on the volume must not lead out of the user's folder.
    match fs::symlink_metadata(&path) {
        Ok(stat) if stat.is_file() => {}
        Ok(_) => return Err(Error::NotFound),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Error::NotFound),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    }
    let data = fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
    Ok((data, kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::test_support::{image, job, ts};
    use crate::outputs::write_job_outputs;

    #[test]
    fn listing_pages_newest_first_and_isolates_users() {
        let root = tempfile::tempdir().unwrap();
        for (i, created) in [
            "2026-11-29T10:00:00Z",
            "2026-11-29T11:00:00Z",
            "2026-11-30T09:00:00Z",
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("job{i}");
            write_job_outputs(root.path(), &job("alice", &id, created), 1, &[image(b"a")]).unwrap();
        }
        write_job_outputs(
            root.path(),
            &job("bob", "bobjob", "2026-11-29T12:00:00Z"),
            1,
            &[image(b"b")],
        )
        .unwrap();
        // A stray temp file and a foreign file are never listed.
        fs::write(
            root.path().join("alice/.20261201_000000_1_x.png.1.0.tmp"),
            b"half",
        )
        .unwrap();
        fs::write(root.path().join("alice/notes.txt"), b"").unwrap();

        let page1 = list_images(root.path(), "alice", 2, None).unwrap();
        let files: Vec<&str> = page1.images.iter().map(|i| i.file.as_str()).collect();
        assert_eq!(
            files,
            ["20261130_090000_1_job2.png", "20261129_110000_1_job1.png"]
        );
        assert_eq!(
            page1.next_before.as_deref(),
            Some("20261129_110000_1_job1.png")
        );
        assert_eq!(page1.images[0].metadata.as_ref().unwrap().job_id, "job2");
        assert_eq!(page1.images[0].bytes, 1);
        assert_eq!(page1.images[0].created_at, ts("2026-11-30T09:00:00Z"));

        let page2 = list_images(root.path(), "alice", 2, page1.next_before.as_deref()).unwrap();
        let files: Vec<&str> = page2.images.iter().map(|i| i.file.as_str()).collect();
        assert_eq!(files, ["20261129_100000_1_job0.png"]);
        assert_eq!(page2.next_before, None);

        let bob = list_images(root.path(), "bob", 50, None).unwrap();
        assert_eq!(bob.images.len(), 1);
        assert_eq!(bob.images[0].metadata.as_ref().unwrap().user, "bob");
        assert!(
            list_images(root.path(), "carol", 50, None)
                .unwrap()
                .images
                .is_empty()
        );
        assert!(matches!(
            list_images(root.path(), "alice", 10, Some("../x")),
            Err(Error::InvalidFileName)
        ));
    }

    #[test]
    fn read_output_rejects_traversal_and_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let files = write_job_outputs(
            root.path(),
            &job("alice", "job0", "2026-11-29T10:00:00Z"),
            1,
            &[image(b"a")],
        )
        .unwrap();
        let file = files[0].path.strip_prefix("alice/").unwrap();
        let (data, kind) = read_output(root.path(), "alice", file).unwrap();
        assert_eq!((data.as_slice(), kind), (b"a".as_slice(), FileKind::Png));
        assert!(matches!(
            read_output(root.path(), "bob", file),
            Err(Error::NotFound)
        ));
        assert!(matches!(
            read_output(root.path(), "alice", "../bob/x.png"),
            Err(Error::InvalidFileName)
        ));
        assert!(matches!(
            read_output(root.path(), "..", file),
            Err(Error::NotFound)
        ));
        std::os::unix::fs::symlink(
            root.path().join("alice").join(file),
            root.path().join("alice/20261129_100000_1_link.png"),
        )
        .unwrap();
        assert!(matches!(
            read_output(root.path(), "alice", "20261129_100000_1_link.png"),
            Err(Error::NotFound)
        ));
    }
}
