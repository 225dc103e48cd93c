//! Atomic, never-clobbering writes of a job's outputs, and finding those of an earlier attempt.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::names::{FileKind, job8, output_stem, parse_file_name, safe_user_dir};
use super::{Error, ImageData, ImageMetadata, JobInfo, OutputFile, io_err};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::test_support::{image, job};

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
}
