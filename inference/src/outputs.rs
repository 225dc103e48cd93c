//! Output files on a tenant's volume.
//!
//! Layout: `<root>/<safe-user>/<yyyymmdd_HHMMSS>_<seed>_<job8>[_<n>].png` plus a `.json`
//! metadata file next to each PNG. Both the inference server (writing) and `serve-outputs`
//! (listing, reading) go through this module, so the user → directory mapping and the file-name
//! pattern exist exactly once.
//!
//! Writes are atomic and never clobber: data goes to a hidden temp file in the same directory,
//! is fsynced, then hard-linked to its final name (`link` fails with `EEXIST` instead of
//! replacing, unlike `rename`), and the directory is fsynced. A reader therefore sees either no
//! file or the complete file, and an existing image is never overwritten.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest file-name component most filesystems accept (ext4, xfs, tmpfs).
const MAX_NAME_BYTES: usize = 255;
/// Default and maximum page size of [`list_images`].
pub const DEFAULT_LIST_LIMIT: usize = 50;
pub const MAX_LIST_LIMIT: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid user name: {0}")]
    InvalidUser(&'static str),
    #[error("invalid output file name")]
    InvalidFileName,
    #[error("no such output file")]
    NotFound,
    #[error("output file {0} already exists")]
    AlreadyExists(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Maps a user name to the name of their directory.
///
/// Injective (distinct users never share a directory) because it is a percent-encoding:
/// `[A-Za-z0-9@._-]` stay as they are, every other byte — `%` itself included — becomes `%XX`,
/// so the original name can always be decoded back. A leading `.` is escaped too, which rules
/// out `.`, `..` and hidden directories; `/` and NUL cannot survive.
pub fn safe_user_dir(user: &str) -> Result<String, Error> {
    if user.is_empty() {
        return Err(Error::InvalidUser("empty"));
    }
    let mut out = String::with_capacity(user.len());
    for (i, b) in user.bytes().enumerate() {
        let keep =
            b.is_ascii_alphanumeric() || matches!(b, b'@' | b'_' | b'-') || (b == b'.' && i > 0);
        if keep {
            out.push(char::from(b));
        } else {
            write!(out, "%{b:02X}").expect("writing to a String cannot fail");
        }
    }
    if out.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidUser("too long"));
    }
    Ok(out)
}

/// The stem shared by an image's PNG and JSON files.
///
/// `job8` is the first 8 ASCII alphanumerics of the job id (the hex prefix of a Kubernetes UID),
/// which keeps names short while distinguishing jobs that finish in the same second.
pub fn output_stem(created: Timestamp, seed: u64, job_id: &str, index: u32) -> String {
    let job8 = job8(job_id);
    let stamp = created.strftime("%Y%m%d_%H%M%S");
    if index == 0 {
        format!("{stamp}_{seed}_{job8}")
    } else {
        format!("{stamp}_{seed}_{job8}_{index}")
    }
}

fn job8(job_id: &str) -> String {
    job_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Png,
    Json,
}

impl FileKind {
    pub fn content_type(self) -> &'static str {
        match self {
            FileKind::Png => "image/png",
            FileKind::Json => "application/json",
        }
    }
}

/// Accepts exactly the names [`output_stem`] produces, with `.png` or `.json`.
///
/// This is the whole defence against path traversal in `serve-outputs`: a name that passes has
/// no `/`, no `..`, no leading dot, only ASCII digits, letters and `_`.
pub fn parse_file_name(name: &str) -> Option<FileKind> {
    let (stem, kind) = if let Some(stem) = name.strip_suffix(".png") {
        (stem, FileKind::Png)
    } else if let Some(stem) = name.strip_suffix(".json") {
        (stem, FileKind::Json)
    } else {
        return None;
    };
    let digits = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    let job = |s: &str| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric());
    let parts: Vec<&str> = stem.split('_').collect();
    let valid = match parts.as_slice() {
        [date, time, seed, job8] => {
            digits(date, 8, 8) && digits(time, 6, 6) && digits(seed, 1, 20) && job(job8)
        }
        [date, time, seed, job8, index] => {
            digits(date, 8, 8)
                && digits(time, 6, 6)
                && digits(seed, 1, 20)
                && job(job8)
                && digits(index, 1, 10)
        }
        _ => false,
    };
    valid.then_some(kind)
}

/// What is known about a job when its images are written; recorded in every metadata file.
#[derive(Debug, Clone)]
pub struct JobInfo<'a> {
    pub job_id: &'a str,
    pub user: &'a str,
    pub prompt: &'a str,
    pub steps: u32,
    pub guidance: f32,
    pub model: &'a str,
    pub created_at: Timestamp,
}

/// One encoded image of a job.
#[derive(Debug, Clone, Copy)]
pub struct ImageData<'a> {
    pub png: &'a [u8],
    pub width: u32,
    pub height: u32,
    pub seed: u64,
}

/// The `.json` file written next to each PNG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageMetadata {
    pub prompt: String,
    pub seed: u64,
    pub steps: u32,
    pub guidance: f32,
    pub width: u32,
    pub height: u32,
    pub model: String,
    pub user: String,
    pub job_id: String,
    /// Position of the image in its job's batch (0 for the first).
    pub index: u32,
    pub created_at: Timestamp,
    pub sha256: String,
}

/// A written image, with paths relative to the outputs root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputFile {
    pub path: String,
    pub metadata_path: String,
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

/// Writes a job's images and their metadata under `root`, all or nothing.
///
/// The file names use the job's `seed` (the request's seed) so a batch shares one stem;
/// each metadata file records the seed of its own image. On any error, the files this call
/// already completed are removed, so a failed job leaves nothing behind.
pub fn write_job_outputs(
    root: &Path,
    job: &JobInfo<'_>,
    seed: u64,
    images: &[ImageData<'_>],
) -> Result<Vec<OutputFile>, Error> {
    let user_dir = safe_user_dir(job.user)?;
    let dir = root.join(&user_dir);
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;

    let mut written: Vec<PathBuf> = Vec::new();
    let result = write_all_images(&dir, &user_dir, job, seed, images, &mut written);
    if result.is_err() {
        for path in &written {
            // Best effort: these are our own complete files of a job that is being failed.
            let _ = fs::remove_file(path);
        }
    }
    result
}

fn write_all_images(
    dir: &Path,
    user_dir: &str,
    job: &JobInfo<'_>,
    seed: u64,
    images: &[ImageData<'_>],
    written: &mut Vec<PathBuf>,
) -> Result<Vec<OutputFile>, Error> {
    let mut files = Vec::with_capacity(images.len());
    for (index, image) in (0u32..).zip(images) {
        let stem = output_stem(job.created_at, seed, job.job_id, index);
        let sha256 = hex::encode(Sha256::digest(image.png));
        let metadata = ImageMetadata {
            prompt: job.prompt.to_owned(),
            seed: image.seed,
            steps: job.steps,
            guidance: job.guidance,
            width: image.width,
            height: image.height,
            model: job.model.to_owned(),
            user: job.user.to_owned(),
            job_id: job.job_id.to_owned(),
            index,
            created_at: job.created_at,
            sha256: sha256.clone(),
        };
        let json = serde_json::to_vec_pretty(&metadata).expect("metadata serializes");
        // Metadata first: a listing that finds a PNG can rely on its metadata being there.
        let json_name = format!("{stem}.json");
        written.push(write_new_file(dir, &json_name, &json)?);
        let png_name = format!("{stem}.png");
        written.push(write_new_file(dir, &png_name, image.png)?);
        files.push(OutputFile {
            path: format!("{user_dir}/{png_name}"),
            metadata_path: format!("{user_dir}/{json_name}"),
            sha256,
            width: image.width,
            height: image.height,
            bytes: image.png.len() as u64,
        });
    }
    // Makes the new directory entries themselves durable.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("syncing {}", dir.display())))?;
    Ok(files)
}

/// Creates `dir/name` with `data`, atomically and without replacing an existing file.
fn write_new_file(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf, Error> {
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    // Hidden and not matching the output pattern, so listings never show a half-written file.
    let temp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let target = dir.join(name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::hard_link(&temp, &target)
    })();
    // The temp name goes in every case: on success the final link keeps the data.
    let _ = fs::remove_file(&temp);
    match result {
        Ok(()) => Ok(target),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(Error::AlreadyExists(name.to_owned()))
        }
        Err(e) => Err(io_err(format!("writing {}", target.display()))(e)),
    }
}

/// The complete outputs an earlier run of job `job_id` left under `root`, in batch order.
///
/// A job is sent again when its first pod died or stopped answering; if that pod had already
/// written all `num_images` images, they are the job's result and generating again would put a
/// second set on the volume. The files of an attempt that did not finish its batch (a pod killed
/// between two files) are this job's own partial output: they are removed.
pub fn find_job_outputs(
    root: &Path,
    user: &str,
    job_id: &str,
    seed: u64,
    num_images: u32,
) -> Result<Option<Vec<OutputFile>>, Error> {
    let user_dir = safe_user_dir(user)?;
    let dir = root.join(&user_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    // Stems are `<date>_<time>_<seed>_<job8>[_<n>]`; one attempt's images share the part up to
    // `<job8>`. Only this job's names are opened.
    const STAMP_LEN: usize = "yyyymmdd_HHMMSS".len();
    let infix = format!("_{seed}_{}", job8(job_id));
    let mut attempts: BTreeMap<String, Vec<(ImageMetadata, String)>> = BTreeMap::new();
    let mut partial: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if parse_file_name(&name) != Some(FileKind::Json) {
            continue;
        }
        let stem = &name[..name.len() - ".json".len()];
        let Some(rest) = stem[STAMP_LEN..].strip_prefix(&infix) else {
            continue;
        };
        if !(rest.is_empty() || rest.starts_with('_')) {
            continue;
        }
        let Some(metadata) = fs::read(dir.join(&name))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<ImageMetadata>(&bytes).ok())
            .filter(|m| m.job_id == job_id)
        else {
            continue;
        };
        let png = format!("{stem}.png");
        if fs::symlink_metadata(dir.join(&png)).is_ok_and(|stat| stat.is_file()) {
            let attempt = stem[..STAMP_LEN + infix.len()].to_string();
            attempts.entry(attempt).or_default().push((metadata, png));
        } else {
            partial.push(name);
        }
    }
    let mut complete = None;
    for (attempt, mut images) in attempts {
        images.sort_by_key(|(metadata, _)| metadata.index);
        let whole = images.len() == num_images as usize
            && images.iter().zip(0u32..).all(|((m, _), i)| m.index == i);
        if whole && complete.is_none() {
            complete = Some(images);
        } else if !whole {
            tracing::warn!(
                job = job_id,
                attempt,
                "an earlier attempt left an incomplete batch"
            );
            for (_, png) in images {
                let json = format!("{}.json", png.trim_end_matches(".png"));
                partial.push(png);
                partial.push(json);
            }
        }
    }
    for name in &partial {
        tracing::warn!(
            job = job_id,
            file = name,
            "removing the partial output of an earlier attempt"
        );
        fs::remove_file(dir.join(name)).map_err(io_err(format!("removing {name}")))?;
    }
    let Some(images) = complete else {
        return Ok(None);
    };
    let mut files = Vec::with_capacity(images.len());
    for (metadata, png) in images {
        let bytes = fs::metadata(dir.join(&png))
            .map_err(io_err(format!("reading {png}")))?
            .len();
        files.push(OutputFile {
            metadata_path: format!("{user_dir}/{}.json", png.trim_end_matches(".png")),
            path: format!("{user_dir}/{png}"),
            sha256: metadata.sha256,
            width: metadata.width,
            height: metadata.height,
            bytes,
        });
    }
    Ok(Some(files))
}

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

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn safe_user_dir_keeps_plain_names() {
        assert_eq!(
            safe_user_dir("alice@example.com").unwrap(),
            "alice@example.com"
        );
        assert_eq!(safe_user_dir("Bob_O-Neil.x").unwrap(), "Bob_O-Neil.x");
    }

    #[test]
    fn safe_user_dir_escapes_hostile_names() {
        assert_eq!(safe_user_dir("..").unwrap(), "%2E.");
        assert_eq!(safe_user_dir(".").unwrap(), "%2E");
        assert_eq!(safe_user_dir(".hidden").unwrap(), "%2Ehidden");
        assert_eq!(
            safe_user_dir("../etc/passwd").unwrap(),
            "%2E.%2Fetc%2Fpasswd"
        );
        assert_eq!(safe_user_dir("a/b").unwrap(), "a%2Fb");
        assert_eq!(safe_user_dir("a\0b").unwrap(), "a%00b");
        assert_eq!(safe_user_dir("100%").unwrap(), "100%25");
        assert_eq!(safe_user_dir("é").unwrap(), "%C3%A9");
        assert!(matches!(safe_user_dir(""), Err(Error::InvalidUser(_))));
        assert!(matches!(
            safe_user_dir(&"/".repeat(100)),
            Err(Error::InvalidUser(_))
        ));
    }

    #[test]
    fn safe_user_dir_is_injective_on_tricky_pairs() {
        let users = [
            "a/b", "a%2Fb", "a_b", "a b", "a%20b", ".a", "%2Ea", "a.", "A", "a", "..", "%2E.",
            "a\\b",
        ];
        let dirs: std::collections::HashSet<String> =
            users.iter().map(|u| safe_user_dir(u).unwrap()).collect();
        assert_eq!(dirs.len(), users.len());
        for dir in &dirs {
            assert!(
                !dir.starts_with('.') && !dir.contains('/') && !dir.contains('\0'),
                "{dir}"
            );
        }
    }

    #[test]
    fn stems_and_file_names() {
        let t = ts("2026-11-29T22:35:01Z");
        let stem = output_stem(t, 42, "1a2b3c4d-5e6f-7a8b-9c0d-111122223333", 0);
        assert_eq!(stem, "20261129_223501_42_1a2b3c4d");
        assert_eq!(
            output_stem(t, 42, "1a2b3c4d-5e6f", 2),
            "20261129_223501_42_1a2b3c4d_2"
        );
        assert_eq!(output_stem(t, 7, "ab-c", 0), "20261129_223501_7_abc");
        assert_eq!(parse_file_name(&format!("{stem}.png")), Some(FileKind::Png));
        assert_eq!(
            parse_file_name(&format!("{stem}_3.json")),
            Some(FileKind::Json)
        );
        for bad in [
            "../x.png",
            ".20261129_223501_42_1a2b3c4d.png",
            "20261129_223501_42_1a2b3c4d.png.tmp",
            "20261129_223501_42_1a2b3c4d.txt",
            "20261129_223501_42_1a2b3c4d/../../x.png",
            "2026112_223501_42_1a2b3c4d.png",
            "20261129_223501_42_1a2b3c4d9.png",
            "20261129_223501_x_1a2b3c4d.png",
            "20261129_223501_42_1a2b3c4d_1_2.png",
            "",
            ".png",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    fn job<'a>(user: &'a str, id: &'a str, created: &str) -> JobInfo<'a> {
        JobInfo {
            job_id: id,
            user,
            prompt: "a red fox",
            steps: 4,
            guidance: 3.5,
            model: "tiny",
            created_at: ts(created),
        }
    }

    fn image(png: &[u8]) -> ImageData<'_> {
        ImageData {
            png,
            width: 256,
            height: 256,
            seed: 42,
        }
    }

    #[test]
    fn writes_png_and_metadata() {
        let root = tempfile::tempdir().unwrap();
        let files = write_job_outputs(
            root.path(),
            &job("alice@example.com", "1a2b3c4d-ffff", "2026-11-29T22:35:01Z"),
            42,
            &[image(b"png-0"), image(b"png-1")],
        )
        .unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(
            files[0].path,
            "alice@example.com/20261129_223501_42_1a2b3c4d.png"
        );
        assert_eq!(
            files[1].metadata_path,
            "alice@example.com/20261129_223501_42_1a2b3c4d_1.json"
        );
        assert_eq!(
            fs::read(root.path().join(&files[1].path)).unwrap(),
            b"png-1"
        );
        assert_eq!(files[0].sha256, hex::encode(Sha256::digest(b"png-0")));
        let meta: ImageMetadata =
            serde_json::from_slice(&fs::read(root.path().join(&files[0].metadata_path)).unwrap())
                .unwrap();
        assert_eq!(meta.job_id, "1a2b3c4d-ffff");
        assert_eq!(meta.sha256, files[0].sha256);
        assert_eq!(meta.index, 0);
        // Nothing but the four final files: the temp files are gone.
        let mut names: Vec<String> = fs::read_dir(root.path().join("alice@example.com"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn finds_the_complete_outputs_of_an_earlier_attempt() {
        let root = tempfile::tempdir().unwrap();
        let info = job("alice", "1a2b3c4d-0001", "2026-11-29T22:35:01Z");
        let written =
            write_job_outputs(root.path(), &info, 42, &[image(b"a"), image(b"b")]).unwrap();
        // Another job whose id shares the 8-character prefix is not this job.
        let other = job("alice", "1a2b3c4d-0002", "2026-11-29T22:35:02Z");
        write_job_outputs(root.path(), &other, 42, &[image(b"c")]).unwrap();

        let found = find_job_outputs(root.path(), "alice", "1a2b3c4d-0001", 42, 2).unwrap();
        assert_eq!(found, Some(written));
        assert_eq!(
            find_job_outputs(root.path(), "alice", "1a2b3c4d-0003", 42, 1).unwrap(),
            None
        );
        assert_eq!(
            find_job_outputs(root.path(), "bob", "1a2b3c4d-0001", 42, 2).unwrap(),
            None
        );
        assert_eq!(files_in(&root.path().join("alice")).len(), 6);
    }

    #[test]
    fn removes_the_incomplete_batch_of_a_killed_attempt() {
        let root = tempfile::tempdir().unwrap();
        let info = job("alice", "1a2b3c4d-0001", "2026-11-29T22:35:01Z");
        let written =
            write_job_outputs(root.path(), &info, 42, &[image(b"a"), image(b"b")]).unwrap();
        let other = job("alice", "77777777", "2026-11-29T22:35:01Z");
        write_job_outputs(root.path(), &other, 42, &[image(b"c")]).unwrap();
        // Killed after the second image's metadata, before its PNG.
        fs::remove_file(root.path().join(&written[1].path)).unwrap();

        let found = find_job_outputs(root.path(), "alice", "1a2b3c4d-0001", 42, 2).unwrap();
        assert_eq!(found, None);
        let left = files_in(&root.path().join("alice"));
        assert_eq!(left.len(), 2, "only the other job's files remain: {left:?}");
        assert!(
            left.iter().all(|name| name.contains("_77777777")),
            "{left:?}"
        );
    }

    fn files_in(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    #[test]
    fn never_clobbers_and_fails_all_or_nothing() {
        let root = tempfile::tempdir().unwrap();
        let info = job("alice", "1a2b3c4d", "2026-11-29T22:35:01Z");
        write_job_outputs(root.path(), &info, 42, &[image(b"first")]).unwrap();
        // Same name again (same second, seed and job prefix), as a two-image batch: the second
        // image's name is free, but the first collides, so nothing new may remain.
        let err =
            write_job_outputs(root.path(), &info, 42, &[image(b"x"), image(b"y")]).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        let dir = root.path().join("alice");
        assert_eq!(
            fs::read(dir.join("20261129_223501_42_1a2b3c4d.png")).unwrap(),
            b"first"
        );
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
    }

    #[test]
    fn write_error_leaves_no_file() {
        let root = tempfile::tempdir().unwrap();
        // A regular file where the user's directory should be: every write below it fails,
        // also for root (which ignores permission bits, so a read-only dir would not do).
        fs::write(root.path().join("alice"), b"").unwrap();
        let err = write_job_outputs(
            root.path(),
            &job("alice", "1a2b3c4d", "2026-11-29T22:35:01Z"),
            42,
            &[image(b"data")],
        )
        .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
    }

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
