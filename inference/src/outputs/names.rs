//! The user → directory mapping and the output file-name pattern.

use std::fmt::Write as _;

use jiff::Timestamp;

use super::Error;

/// Longest file-name component most filesystems accept (ext4, xfs, tmpfs).
const MAX_NAME_BYTES: usize = 255;

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

pub(super) fn job8(job_id: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::test_support::ts;

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
}
