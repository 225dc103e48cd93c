//! Names and labels of the objects the operator creates in a tenant namespace. Shared by the
//! controllers, the API (which finds inference and outputs pods through them) and the tests.

/// Field manager of every server-side apply by the operator.
pub const FIELD_MANAGER: &str = "atelier-operator";

pub const INFERENCE: &str = "inference";
pub const OUTPUTS: &str = "outputs";
/// The output PersistentVolumeClaim.
pub const OUTPUTS_CLAIM: &str = "outputs";
/// ServiceAccount of the tenant's pods (no token mounted).
pub const WORKLOAD_SERVICE_ACCOUNT: &str = "atelier-workload";
/// The Secret holding the tenant's token for the inference and outputs APIs (key
/// [`API_TOKEN_KEY`]), created once by the operator, mounted into the tenant's pods and sent by
/// the dispatcher and the API as `Authorization: Bearer`.
pub const API_TOKEN_SECRET: &str = "atelier-api-token";
pub const API_TOKEN_KEY: &str = "token";
/// Port of the inference job API and of the outputs server.
pub const HTTP_PORT: u16 = 8080;
pub const HTTP_PORT_NAME: &str = "http";

pub const LABEL_TENANT: &str = "atelier.dev/tenant";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";

/// Finalizer that lets the tenant controller cancel jobs and keep data before the namespace goes.
pub const TENANT_FINALIZER: &str = "atelier.dev/tenant-cleanup";

/// Longest user id accepted (OIDC allows `sub` up to 255 ASCII characters).
pub const MAX_USER_LEN: usize = 256;

/// OpenAPI pattern of `spec.user` and `members[].user`, the same rule as [`user_name_problem`]
/// for the API server (Go regular expressions: `\p{C}` is control, format, private-use and
/// surrogate characters, `\p{Z}` separators). A pattern rather than a CEL rule: it has no cost
/// budget, so it also fits the unbounded member list. The two alternatives say "not `.` or
/// `..`": some character other than a dot, or three characters at least.
pub const USER_NAME_PATTERN: &str =
    r"^(?:[^\p{C}\p{Z}\s/\\]*[^\p{C}\p{Z}\s/\\.][^\p{C}\p{Z}\s/\\]*|[^\p{C}\p{Z}\s/\\]{3,})$";

/// Why `user` cannot be a user id, or `None` when it can. A user id names a folder of the
/// outputs volume and a path segment of the outputs URL, and is compared with `members[].user`:
/// text that prints the same as another id (a TAB, a zero-width space, a bidi override) or that
/// URL or path handling drops (`.`, `..`, `/`) would let one identity pass for another.
pub fn user_name_problem(user: &str) -> Option<&'static str> {
    if user.is_empty() {
        return Some("is empty");
    }
    if user.chars().count() > MAX_USER_LEN {
        return Some("is longer than 256 characters");
    }
    if user == "." || user == ".." {
        return Some("is a relative path segment");
    }
    if user.contains(['/', '\\']) {
        return Some("contains '/' or '\\'");
    }
    if user.chars().any(|c| c.is_whitespace()) {
        return Some("contains white space");
    }
    if user.chars().any(is_unprintable) {
        return Some("contains a control, format or private-use character");
    }
    None
}

/// Unicode categories Cc, Cf and Co (what RE2's `\p{C}` matches; surrogates cannot occur in
/// a Rust string).
fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            u32::from(c),
            // Cf, Unicode 16.
            0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x890..=0x891 | 0x8E2 | 0x180E
                | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F
                | 0xFEFF | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F
                | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F
                // Co.
                | 0xE000..=0xF8FF | 0xF0000..=0xFFFFD | 0x100000..=0x10FFFD
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for good in [
            "alice@example.com",
            "ünïcode@例え.jp",
            "248289761001",
            "a.b",
        ] {
            assert_eq!(user_name_problem(good), None, "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "al\tice@example.com",
            ".\t.",
            "alice@example.com\n",
            "al ice",
            "al\u{200b}ice",
            "\u{202e}moc.elpmaxe@ecila",
            "al\u{e000}ice",
            "a/b",
            "a\\b",
            "al\u{7f}ice",
        ] {
            assert!(user_name_problem(bad).is_some(), "{bad:?} was accepted");
        }
        assert!(user_name_problem(&"a".repeat(MAX_USER_LEN)).is_none());
        assert!(user_name_problem(&"a".repeat(MAX_USER_LEN + 1)).is_some());
    }
}
